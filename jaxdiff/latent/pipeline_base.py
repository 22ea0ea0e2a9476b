"""`PipelineBase`: the one set of public methods of whatever `jaxdiff.Pipeline.from_pretrained` /
`from_checkpoint` loaded — `sample`, `denoise`, `text_to_image`, `image_to_image`, `inpaint`, `upscale`,
and the LoRA methods `load_lora`, `set_lora_scale`, `fuse_lora`, `unfuse_lora`.

A pipeline overrides the methods its model can do; the others raise `UsageError` in one line naming the method and
what was loaded. A text-to-image model does not `sample`: it draws through `text_to_image`, unconditional samples
with the empty prompt (`text_to_image([""] * n)`). It lives in `latent/`, the room below both pipelines
(`jaxdiff.sampling.pipeline.Pipeline` and `jaxdiff.latent.pipeline.LatentPipeline`)."""

from __future__ import annotations

import abc

from jaxdiff.errors import UsageError

# What each method needs of the loaded model.
NEEDS = {
    "sample": "a pixel-space model; for a text-to-image model use text_to_image(prompts), or text_to_image([''] * n) "
              "for unconditional samples",
    "denoise": "a pixel-space model; a text-to-image model denoises inside text_to_image",
    "text_to_image": "a text-to-image model (a Stable Diffusion folder or file, or a latent run)",
    "image_to_image": "a text-to-image model (a Stable Diffusion folder or file, or a latent run)",
    "inpaint": "a text-to-image model (a Stable Diffusion folder or file, or a latent run)",
    "upscale": "an x4 upscaler (a StableDiffusionUpscalePipeline folder)",
    **dict.fromkeys(("load_lora", "set_lora_scale", "fuse_lora", "unfuse_lora"),
                    "a text-to-image model (LoRA adapters apply to its U-Net or transformer and its CLIP text encoders)"),
}  # fmt: skip


class PipelineBase(abc.ABC):
    """The public methods every loaded pipeline has; each one the model cannot do raises `UsageError`."""

    @property
    @abc.abstractmethod
    def loaded(self) -> str:
        """What was loaded, in words (for messages)."""

    def _unavailable(self, method: str) -> UsageError:
        return UsageError(f"{method}() needs {NEEDS[method]}; this pipeline holds {self.loaded}")

    def sample(self, *args, **kwargs):
        raise self._unavailable("sample")

    def denoise(self, *args, **kwargs):
        raise self._unavailable("denoise")

    def text_to_image(self, *args, **kwargs):
        raise self._unavailable("text_to_image")

    def image_to_image(self, *args, **kwargs):
        raise self._unavailable("image_to_image")

    def inpaint(self, *args, **kwargs):
        raise self._unavailable("inpaint")

    def upscale(self, *args, **kwargs):
        raise self._unavailable("upscale")

    def load_lora(self, *args, **kwargs):
        raise self._unavailable("load_lora")

    def set_lora_scale(self, *args, **kwargs):
        raise self._unavailable("set_lora_scale")

    def fuse_lora(self, *args, **kwargs):
        raise self._unavailable("fuse_lora")

    def unfuse_lora(self, *args, **kwargs):
        raise self._unavailable("unfuse_lora")
