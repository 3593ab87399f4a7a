"""semsafe_jax: semantically consistent refusal fine-tuning for LLMs, in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="semsafe_jax",
    version="0.1.0",
    description=(
        "Fine-tune LLMs so they refuse harmful requests consistently across "
        "paraphrases (LoRA + embedding-MLP adapters, JAX/Flax NNX)."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["semsafe_jax", "semsafe_jax.*"]),
    package_data={"semsafe_jax": ["data/builtin/*.jsonl", "data/builtin/*.md",
                                  "data/builtin/*.py", "eval/*.jsonl", "eval/*.txt",
                                  "eval/*.md"]},
    install_requires=[
        "jax>=0.8",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "transformers>=4.56",
        "sentence-transformers>=3.0",
        "faiss-cpu>=1.8",
        "ml-collections>=1.0",
        "absl-py>=2.0",
        "numpy>=1.26",
        "safetensors>=0.4",
        "gguf>=0.10",
        "huggingface_hub>=0.30",
        "tqdm>=4.60",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        # A caching malloc for CPU runs (semsafe_jax/malloc.py): XLA's per-step
        # temporaries otherwise page-fault in afresh every step under glibc.
        "tbb>=2021.10; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    extras_require={
        # torch is the numerical oracle in tests; 2.13.0 is pinned because this
        # CPU build installs from the local wheel cache instead of a multi-GB download.
        "test": ["pytest>=8", "torch==2.13.0", "peft>=0.13"],
        "dev": ["pytest>=8", "torch==2.13.0", "peft>=0.13", "ruff"],
    },
)
