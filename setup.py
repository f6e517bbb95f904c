from setuptools import find_packages, setup

setup(
    name="optimized-sd",
    version="0.1.0",
    description="Low-VRAM Stable Diffusion v1.x command-line generator (optimizedSD-style scripts)",
    packages=find_packages(include=["ldm", "ldm.*", "optimizedSD", "optimizedSD.*"]),
    package_data={"optimizedSD.server": ["*.html"]},  # the server's page
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
        "opencv-python",  # ControlNet hints: the webui extension's resizing and Canny (invisible-watermark pulls it too)
    ],
    extras_require={
        "openvino": ["openvino>=2024.0"],  # --backend openvino (ldm/backends/): pulls numpy and openvino-telemetry
        "test": ["pytest", "diffusers>=0.27", "accelerate", "scipy", "psutil", "picklescan", "fickling", "peft", "piexif", "tomesd==0.1.3",
                 "fastapi>=0.110", "uvicorn>=0.29", "webuiapi", "requests", "selenium>=4.10", "DeepCache==0.1.1"],
        "server": ["fastapi>=0.110", "uvicorn>=0.29"],  # optimizedSD/optimized_server.py (the webui's own stack)
    },
)
