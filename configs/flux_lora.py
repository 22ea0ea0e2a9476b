"""DreamBooth LoRA of Flux.1 [dev] as diffusers' README runs train_dreambooth_lora_flux.py (task `flow_lora`; see
`jaxdiff.config.recipes.flow_lora`). Give the folder and the captioned images:

    jaxdiff train --config configs/flux_lora.py --workdir runs/flux_lora \\
        --config.flow.pretrained=FLUX.1-dev --config.data.data_dir=dog_images
"""

from jaxdiff.config.recipes import flow_lora


def get_config():
    return flow_lora("flux")
