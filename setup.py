from setuptools import setup

setup(
    name="minidolly",
    version="0.1.0",
    description="Databricks' Dolly 2.0 (GPT-NeoX / Pythia) from scratch in PyTorch: model, FSDP2 training, Triton kernels.",
    packages=["minidolly", "kernels"],
    package_data={"minidolly": ["static/*.html"]},  # the chat page that `generate.py --serve` serves at /
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "numpy",
        "tokenizers>=0.15",
        "safetensors>=0.4",
        "huggingface_hub>=0.20",
        "triton; platform_system == 'Linux'",
    ],
    extras_require={
        "test": ["pytest", "transformers>=4.40", "peft>=0.10", "gguf>=0.10", "llama-cpp-python>=0.3", "openai>=1.0", "httpx>=0.27", "selenium>=4.10"],
        "plot": ["matplotlib"],
        "gguf": ["gguf>=0.10"],  # save_gguf / generate.py --export-gguf
        "serve": ["starlette>=0.37", "uvicorn>=0.29"],
    },
)
