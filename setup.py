from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
version = {}
exec((ROOT / "skywork_deploy" / "version.py").read_text(), version)

# `serve`, and `run`/`bench`/`eval --endpoint`: the OpenAI API server (FastAPI + uvicorn + sse-starlette) and client
SERVE = ["fastapi>=0.110", "uvicorn>=0.29", "httpx>=0.27", "sse-starlette>=2.0"]

setup(
    name="skywork-deploy",
    version=version["__version__"],
    description="Patch, quantize, calibrate, export, compile and run Qwen2 / Skywork-OR1 models for VastAI VACC",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The owner's top-level folders are shipped inside the package, so a regular wheel carries them.
    packages=find_packages(include=["skywork_deploy", "skywork_deploy.*"]) + [
        "skywork_deploy.source_code", "skywork_deploy.build_in", "skywork_deploy.calibration",
    ],
    package_dir={
        "skywork_deploy": "skywork_deploy",
        "skywork_deploy.source_code": "source_code",
        "skywork_deploy.build_in": "build_in",
        "skywork_deploy.calibration": "calibration",
    },
    package_data={
        "skywork_deploy.build_in": ["build/*.yaml", "*.md"],
        "skywork_deploy.calibration": ["*.gz", "*.json", "*.zip", "*.md", "ceval/*/*.csv"],
        "skywork_deploy.demo_model": ["*.jsonl", "weights/*.json", "weights/*.safetensors"],
    },
    install_requires=[
        "click>=8.1",
        "pyyaml>=6",
        "numpy>=1.24",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "psutil>=5.9",
        "torch>=2.1",
        "transformers>=4.45.2",
        "tokenizers>=0.20",
        "huggingface_hub>=0.24",
        "onnx>=1.16",
        "onnxruntime>=1.18",
        "onnxscript>=0.1",
        "math-verify>=0.7",  # eval: parse and verify answers
    ],
    extras_require={
        "simplify": ["onnxsim>=0.4"],
        "datasets": ["datasets>=2.19"],
        "serve": SERVE,
        "test": ["pytest>=7", "onnxsim>=0.4", "datasets>=2.19", "openai>=1.40", *SERVE],
        "bench": ["matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["skywork-deploy=skywork_deploy.cli:main"]},
)
