from setuptools import find_packages, setup

setup(
    name="optimized-sd",
    version="0.1.0",
    description="Low-VRAM Stable Diffusion v1.x command-line generator (optimizedSD-style scripts)",
    packages=find_packages(include=["ldm", "ldm.*", "optimizedSD", "optimizedSD.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1,<3",
        "numpy",
        "omegaconf>=2.1",
        "einops",
        "Pillow",
        "tqdm",
        "transformers>=4.30",
        "safetensors",
        "ftfy",
        "regex",
        "invisible-watermark",
        "torchsde",  # the SDE samplers' Brownian trees (as the webui and ComfyUI)
    ],
    extras_require={
        "test": ["pytest", "diffusers>=0.27", "accelerate", "scipy", "psutil", "picklescan", "fickling", "peft", "piexif", "tomesd==0.1.3", "DeepCache==0.1.1"],
    },
)
