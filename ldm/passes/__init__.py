"""Generations made of several passes of the pipeline's stages (:mod:`ldm.pipeline`), as AUTOMATIC1111's webui
makes them: the txt2img hires fix (:mod:`ldm.passes.hires`: a small picture, upscaled, repainted by img2img at
the large size) and "Inpaint area: Only masked" (:mod:`ldm.passes.only_masked`: the mask's box cut out, inpainted
at the run's size, pasted back)."""
