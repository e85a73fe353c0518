"""The `torch` backend: our patched Qwen2 in eager PyTorch, the reference the other backends are compared to."""
import logging

from .backend import Backend

log = logging.getLogger(__name__)


class TorchBackend(Backend):
    """Our patched Qwen2 (skywork_deploy.base.modeling.load_model) in eager PyTorch: the reference backend.

    For an int8 bundle exported from a float folder, the weights are quantized per channel (W8A16) as the
    exporter did, so the torch backend computes the same arithmetic as the graphs.
    """

    name = "torch"

    def __init__(self, bundle, threads=None, **_):
        super().__init__(bundle)
        import torch

        from ..base.modeling import load_model

        if threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        folder = bundle.source_model()
        dtype = {"fp16": "fp16", "bf16": "bf16"}.get(bundle.dtype, "fp32")
        self.model = load_model(folder, dtype=dtype, insert_slice=True)
        if bundle.dtype == "int8" and not getattr(self.model.config, "vacc_quantization", None):
            self.model.quantize(8)
        self.source = folder
        self._torch = torch

    def prefill(self, input_ids, attention_mask, position_ids):
        torch = self._torch
        with torch.inference_mode():
            out = self.model(torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask),
                             position_ids=torch.from_numpy(position_ids), iter_num=0)
        return out.logits[:, -1, :].float().numpy(), out.past_key_values

    def decode(self, token_ids, attention_mask, position_ids, kv):
        torch = self._torch
        with torch.inference_mode():
            out = self.model(torch.from_numpy(token_ids), attention_mask=torch.from_numpy(attention_mask),
                             position_ids=torch.from_numpy(position_ids), past_key_values=kv, iter_num=1)
        return out.logits[:, -1, :].float().numpy(), out.past_key_values

    def describe(self):
        return {**super().describe(), "source_model": str(self.source), "threads": self.threads}
