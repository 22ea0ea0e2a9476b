"""DreamBooth LoRA of Stable Diffusion 3 as diffusers' README runs train_dreambooth_lora_sd3.py (task `flow_lora`;
see `jaxdiff.config.recipes.flow_lora`). Give the folder and the captioned images:

    jaxdiff train --config configs/sd3_lora.py --workdir runs/sd3_lora \\
        --config.flow.pretrained=stable-diffusion-3-medium-diffusers --config.data.data_dir=dog_images
"""

from jaxdiff.config.recipes import flow_lora


def get_config():
    return flow_lora("sd3")
