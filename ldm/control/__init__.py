"""ControlNet for SD v1 (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models"): lllyasviel's network, its files, its hints, and its residuals added to the UNet's skips."""
