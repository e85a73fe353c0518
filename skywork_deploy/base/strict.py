"""Strict readers for the files a user gives: JSON and YAML with duplicate keys refused (which `rope_theta` is
meant?), YAML within a size and alias budget (a 2 KB alias bomb expands to billions of values), text that must
be UTF-8, and files that cannot be read named in one line.
"""
import codecs
import json
from pathlib import Path

from .errors import ConfigError, ModelFormatError

YAML_MAX_BYTES = 1 << 20      # a build.yaml is a few hundred bytes
YAML_MAX_VALUES = 100_000     # values after expanding aliases


def read_input_text(path, error=ModelFormatError, max_bytes=None, what="file"):
    """The UTF-8 text of an input file; unreadable, over `max_bytes` or not UTF-8: one `error` naming it."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(-1 if max_bytes is None else max_bytes + 1)
    except PermissionError:
        raise error(f"{path}: not readable (permission denied); fix its permissions, e.g. chmod u+r") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder, expected a {what}") from None
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if max_bytes is not None and len(raw) > max_bytes:
        raise error(f"{path}: larger than {max_bytes} bytes, too large for a {what}; check that it is the right "
                    "file")
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_LE)):
        raise error(f"{path}: UTF-16/32 text; save it as UTF-8")
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); save it as "
                    "UTF-8") from None


def unique_pairs(where, error=ModelFormatError):
    """An `object_pairs_hook` for json that refuses a key given twice in one object, naming it and `where`."""
    def pairs(items):
        out = {}
        for key, value in items:
            if key in out:
                raise error(f"{where}: the key {key!r} appears twice in one object (which value is meant? keep "
                            "one)")
            out[key] = value
        return out
    return pairs


def loads_json(text, where, error=ModelFormatError, hint=""):
    """JSON with every duplicate key refused, naming the key and `where`; NaN/Infinity refused too."""
    pairs = unique_pairs(where, error)

    def constant(name):
        raise error(f"{where}: {name} is not a JSON number (write a finite number)")

    try:
        return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except json.JSONDecodeError as exc:
        raise error(f"{where}: not valid JSON (line {exc.lineno}: {exc.msg}){hint}") from None
    except RecursionError:
        raise error(f"{where}: nested too deeply to be a real file") from None


def read_json_file(path, error=ModelFormatError, max_bytes=None):
    """read_input_text + loads_json."""
    return loads_json(read_input_text(path, error, max_bytes, "JSON file"), str(path), error)


def load_yaml(text, where, max_bytes=YAML_MAX_BYTES, max_values=YAML_MAX_VALUES):
    """YAML (safe tags only) with duplicate keys refused and a size and alias budget checked before it is built."""
    import yaml

    if len(text) > max_bytes:
        raise ConfigError(f"{where}: {len(text)} characters, more than a settings file holds ({max_bytes}); "
                          "check that it is the right file")
    loader = _strict_loader(yaml)(text)
    loader.name = where
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > max_values:
            raise ConfigError(f"{where}: expands to more than {max_values} values through YAML aliases "
                              "(&anchor / *alias); write the values out")
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply (or an alias refers to itself); write the values out") \
            from None
    finally:
        loader.dispose()


def _expanded_size(node, memo):
    """How many values `node` stands for once every alias is expanded (shared nodes counted each time)."""
    key = id(node)
    if key not in memo:
        children = node.value if isinstance(node.value, list) else []
        flat = [part for item in children for part in (item if isinstance(item, tuple) else (item,))]
        memo[key] = 1 + sum(_expanded_size(child, memo) for child in flat)
    return memo[key]


def _strict_loader(yaml):
    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise ConfigError(f"{self.name}: the key {key!r} appears twice (line {key_node.start_mark.line + 1}"
                                      "; which value is meant? keep one)")
                seen.add(key)
            return super().construct_mapping(node, deep)
    return StrictLoader
