"""The VACC Qwen2 model files that `skywork-deploy patch` writes beside a model's weights.

Installed as the package `skywork_deploy.source_code`; the three modules use relative imports only,
so they work both from here and when transformers loads them with trust_remote_code.
"""
SOURCE_FILES = ("configuration_qwen2_vacc.py", "modeling_qwen2_vacc.py", "quantization_vacc.py")
