"""Packaging for μ0: one distribution `mu0`, one import namespace `mu0`.

The design card fixes the top-level folders; `package_dir` maps them under `mu0` so nothing generic
(`processing`, `training`) lands in site-packages.
"""

from setuptools import setup

PACKAGE_DIR = {
    "mu0": "modeling_mu0",
    "mu0.processing": "processing",
    "mu0.dataset_builders": "dataset_builders",
    "mu0.training": "training",
    "mu0.model_cards": "model_cards",
}

EXTRACT = ["opencv-python-headless>=4.8", "av>=12", "scipy>=1.10", "h5py>=3.8"]
# MuJoCo renders offscreen through EGL (`MUJOCO_GL=egl`); metaworld pins the MuJoCo release it supports.
SIM = ["mujoco>=3.2", "metaworld>=3.0", "gymnasium>=1.0"]
RERUN = ["rerun-sdk>=0.20"]
APP = ["gradio>=5.0"]
SCALE = ["ray[data]>=2.40"]  # `mu0 extract --executor ray`

EXTRAS = {
    "extract": EXTRACT,
    "viz": ["matplotlib>=3.7"],
    "sim": SIM,
    "rerun": RERUN,
    "app": APP,
    "scale": SCALE,
    # the browser test drives Debian's chromium through chromium-driver (.ci/run installs both)
    "dev": ["pytest>=8", "hypothesis>=6.100", "matplotlib>=3.7", *EXTRACT, *SIM, *RERUN, *SCALE, *APP, "selenium>=4.20"],
}

setup(
    name="mu0",
    version="0.1.0",
    description="μ0: a 3D interaction-trace world model, native to the Hugging Face stack",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=list(PACKAGE_DIR),
    package_dir=PACKAGE_DIR,
    package_data={"mu0.model_cards": ["*.md"], "mu0.training": ["recipes/*.json", "accelerate/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0",
        "datasets>=4.0",
        "diffusers>=0.35",
        "peft>=0.17",
        "accelerate>=1.10",
        "safetensors>=0.4",
        "huggingface_hub>=1.0",
        "numpy>=1.24",
        "scipy>=1.10",
        "matplotlib>=3.7",
        "pillow>=10.1",  # sized default fonts for overlay legends
        "tqdm>=4.66",
        "av>=12",  # mu0 demo writes an MP4 of its overlays
        "packaging",
    ],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["mu0=mu0.training.cli:main"]},
)
