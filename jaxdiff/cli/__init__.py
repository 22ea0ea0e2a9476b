"""The `jaxdiff` command: train | sample | eval | convert | data | info.

`--config` takes a config file (an ml_collections file defining `get_config()`)
or a recipe name (`jaxdiff.config.recipes.RECIPES`); any key can be overridden as
`--config.section.key=value`, and the result is validated before anything runs.

A user's mistake (bad value, bad file, bad path, missing data: a
`jaxdiff.errors.JaxdiffError`) ends with exit status 2 and one line on stderr;
any other exception is an internal error: status 1, a request to report it and
the traceback. `-v/--verbose` adds the traceback to every error
and shows all libraries' log messages.

`build_parser` declares every verb with its flags and the function that runs it (one module per verb: `train`,
`sample`, `evaluate`, `convert`, `data`); argparse's errors come out on one line.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import traceback

from jaxdiff.cli.config_source import load_config
from jaxdiff.cli.convert import run_convert
from jaxdiff.cli.data import run_data
from jaxdiff.cli.errors import UsageError
from jaxdiff.cli.evaluate import run_eval
from jaxdiff.cli.paths import check_output_dir, check_output_file
from jaxdiff.cli.sample import run_sample
from jaxdiff.cli.sampler_flags import SAMPLER_OPTIONS, add_sampler_flags
from jaxdiff.cli.train import run_info, run_train
from jaxdiff.errors import JaxdiffError

__all__ = [
    "LIBRARY_LOGGERS",
    "SAMPLER_OPTIONS",
    "UsageError",
    "build_parser",
    "check_output_dir",
    "check_output_file",
    "command_logging",
    "load_config",
    "main",
]

logger = logging.getLogger("jaxdiff")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the message and where to find the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from jaxdiff.config.recipes import RECIPES

    verbose_help = "all libraries' log messages; tracebacks"
    common = argparse.ArgumentParser(add_help=False)  # SUPPRESS: `jaxdiff -v VERB` is not overwritten by VERB's default
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help)
    config_help = f"config file (e.g. configs/cifar10.py) or recipe name: {', '.join(RECIPES)}"
    parser = _Parser(prog="jaxdiff", description="Denoising diffusion models in JAX.")
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    def verb(name: str, help: str) -> argparse.ArgumentParser:
        return verbs.add_parser(name, help=help, parents=[common])

    train = verb("train", "train a model (resumes from the workdir's latest checkpoint)")
    train.add_argument("--config", required=True, help=config_help)
    train.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics, samples")
    train.add_argument("--allow-config-change", action="store_true",
                       help="resume even if the saved config of what is trained (model, diffusion, ...) differs")  # fmt: skip
    train.add_argument("--coordinator-address", help="multi-host: host:port of process 0")
    train.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    train.add_argument("--process-id", type=int, help="multi-host: this process's index")
    train.set_defaults(run=run_train)

    sample = verb("sample", "draw images from a trained model (EMA parameters)")
    sample.add_argument("--workdir", help="a `jaxdiff train` workdir (or any format `jaxdiff convert` reads)")
    sample.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    sample.add_argument("--num", type=int, help="number of images (default 64; an x4 upscaler: 1)")
    add_sampler_flags(sample)
    sample.add_argument("--eta", type=float, help="DDIM noise scale (default 0)")
    sample.add_argument("--spacing", help="uniform | quadratic | karras | adm (improved DDPM's respacing) (default: "
                        "the model's, else the sampler's)")  # fmt: skip
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--batch-size", type=int, help="images per device batch (default: config.sampling.batch_size)")
    sample.add_argument("--out", required=True, help="grid.png, images.npz, or a directory/ for resumable .npz shards")
    sample.add_argument("--shard-size", type=int, help="images per shard with --out DIR/ (default 1000)")
    sample.add_argument("--trajectory", help="also write a noise-to-image strip (.png) or animation (.gif)")
    sample.add_argument("--class-label", type=int, help="class to draw (conditional models; default: random)")
    sample.add_argument("--guidance", type=float, help="classifier-free guidance: class-conditional models w >= 0 "
                        "(default: the model's config.sampling.guidance; a SiT .pt 3, its cfg_scale 4); --prompt "
                        "diffusers' scale (default 7.5; an x4 upscaler 9)")  # fmt: skip
    sample.add_argument("--pretrained", help="released weights: a Stable Diffusion folder or .safetensors file, a "
                        "score_sde checkpoint_N, an EDM network-snapshot-*.pkl, a diffusers folder (a DiTPipeline "
                        "folder too), a DiT or SiT .pt (with --vae)")  # fmt: skip
    sample.add_argument("--config", help="--pretrained score_sde / EDM / diffusers weights: their recipe (score_sde: "
                        "its training config, e.g. sde_ve_ncsnpp_continuous or ve/ncsnpp_continuous)")  # fmt: skip
    sample.add_argument("--config-folder", help="--pretrained single file: a diffusers SD folder with its configs "
                        "(an SDXL file: an SDXL folder of its kind, base or refiner, giving its scheduler too; an "
                        "original SD3 / Flux transformer file: that model's diffusers folder, giving the other "
                        "components)")  # fmt: skip
    sample.add_argument("--vae", help="--pretrained DiT/SiT checkpoint (.pt): its autoencoder, a diffusers "
                        "AutoencoderKL folder (e.g. stabilityai/sd-vae-ft-ema)")  # fmt: skip
    sample.add_argument("--variant", choices=("dit", "sit"), help="--pretrained .pt: DiT's diffusion or SiT's flow "
                        "matching (default: train.py's args.model, else SiT for a file named SiT-*, else DiT)")
    sample.add_argument("--dtype", choices=("float32", "bfloat16"), help="--pretrained SD, SDXL, x4 upscaler, SD3, "
                        "Flux or DiT / SiT weights: the networks' compute dtype and the one their weights are held in "
                        "(default float32; bfloat16 halves the weights' memory on GPU / TPU)")  # fmt: skip
    sample.add_argument("--prompt", help="--pretrained: the text prompt")
    sample.add_argument("--negative-prompt", help="--pretrained: the negative prompt")
    sample.add_argument("--prompt-2", help="--pretrained SDXL: the prompt of the second text encoder (default --prompt)")
    sample.add_argument("--negative-prompt-2", help="--pretrained SDXL: the negative prompt of the second text "
                        "encoder (default --negative-prompt)")  # fmt: skip
    sample.add_argument("--init-image", help="--pretrained: image-to-image (or, with --mask, inpainting) from it; an "
                        "x4 upscaler: the low-resolution image to upscale")  # fmt: skip
    sample.add_argument("--strength", type=float, help="--init-image: in (0, 1] (default 0.8; 1 with --mask)")
    sample.add_argument("--mask", help="--init-image: repaint where this image is white")
    sample.add_argument("--height", type=int, help="--pretrained text-to-image height (default: the model's)")
    sample.add_argument("--width", type=int, help="--pretrained text-to-image width (default: the model's)")
    sample.add_argument("--lora", action="append", metavar="FILE[:SCALE]", help="--prompt: a LoRA file (or a folder "
                        "with pytorch_lora_weights.safetensors) at SCALE (default 1); repeat for several")  # fmt: skip
    sample.add_argument("--noise-level", type=int, help="--pretrained x4 upscaler: the noise level added to "
                        "--init-image, in [0, the folder's max_noise_level] (default 20)")  # fmt: skip
    sample.set_defaults(run=run_sample)

    evaluate = verb("eval", "FID / IS / precision-recall / bits-per-dim of a trained model")
    evaluate.add_argument("what", nargs="?", choices=("model", "stats"), default="model",
                          help="'model' (default) scores --workdir; 'stats' caches a dataset split's Inception statistics")  # fmt: skip
    evaluate.add_argument("--workdir", help="a `jaxdiff train` workdir (or any format `jaxdiff convert` reads)")
    evaluate.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    evaluate.add_argument("--metrics", default="fid,is", help="comma-separated: fid, is, pr, bpd")
    evaluate.add_argument("--num-samples", type=int, default=50_000)
    add_sampler_flags(evaluate)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--shard-size", type=int, default=1000)
    evaluate.add_argument("--samples", help="reuse (or resume) the shards of a `jaxdiff sample --out DIR/` job")
    evaluate.add_argument("--reference", help="statistics .npz (keys mu, sigma); default: the dataset's train split")
    evaluate.add_argument("--inception-weights", help="pt_inception-2015-12-05-6726825d.pth or a converted .npz")
    evaluate.add_argument("--data-dir", default="", help="TFDS data_dir")
    evaluate.add_argument("--bpd-batch-size", type=int, default=64)
    evaluate.add_argument("--bpd-images", type=int, help="test images for bits/dim (default: all)")
    evaluate.add_argument("--bpd-num-t", type=int, help="stratified estimate with K random t per image")
    evaluate.add_argument("--dataset", help="eval stats: dataset name, e.g. cifar10")
    evaluate.add_argument("--split", help="eval stats: the split (default train); bits/dim: the held-out split "
                                          "(default test)")  # fmt: skip
    evaluate.add_argument("--inception-batch-size", type=int, default=50)
    evaluate.set_defaults(run=run_eval)

    convert = verb("convert", "convert weights between jaxdiff, diffusers and the official TF format")
    convert.add_argument("--from", dest="source_format",
                         choices=("tf", "diffusers", "jaxdiff", "score_sde", "edm", "score_sde_ve"),
                         help="source format (default: detected)")  # fmt: skip
    convert.add_argument("--to", dest="target_format", choices=("jaxdiff", "diffusers", "diffusers-lora"),
                         default="jaxdiff")
    convert.add_argument("--step", type=int, help="jaxdiff source: checkpoint step (default: latest)")
    convert.add_argument("--dataset", help="training recipe for the converted config (default: the matching release)")
    convert.add_argument("src")
    convert.add_argument("dst")
    convert.set_defaults(run=run_convert)

    data = verb("data", "prepare a dataset for training and evaluation, without TensorFlow; or encode a config's "
                        "dataset into a latent cache (data.latent_cache)")  # fmt: skip
    data.add_argument("action", choices=("prepare", "encode"))
    data.add_argument("dataset", nargs="?", choices=("cifar10",), help="prepare: the dataset")
    data.add_argument("--config", help=f"encode: {config_help}; its data and latent.autoencoder")
    data.add_argument("--out", help="encode: the cache folder to write (resumes its partial .partial folder)")
    data.add_argument("--batch-size", type=int, default=64, help="encode: images per batch (default 64)")
    data.add_argument("--source", help="cifar-10-binary.tar.gz or its extracted folder (default: download)")
    data.add_argument("--data-dir", default="", help="TFDS data_dir (default: TFDS' ~/tensorflow_datasets)")
    data.set_defaults(run=run_data)

    info = verb("info", "parameter count and forward GFLOPs per image of a config's model, the parameter "
                        "count of a Stable Diffusion folder's U-Net, or an SD3 / Flux folder's per-device "
                        "memory")  # fmt: skip
    source = info.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help=config_help)
    source.add_argument("--pretrained", help="a diffusers Stable Diffusion / SDXL folder (or its unet/ folder): "
                                             "its U-Net's parameters, counted from config.json alone; an SD3 / "
                                             "Flux folder: each component's parameters and per-device "
                                             "memory")  # fmt: skip
    info.add_argument("--devices", type=int, help="--pretrained SD3 / Flux: devices the parameters are split over "
                                                  "(default 1)")  # fmt: skip
    info.add_argument("--height", type=int, help="--pretrained SD3 / Flux: image height in pixels (default 1024)")
    info.add_argument("--width", type=int, help="--pretrained SD3 / Flux: image width in pixels (default 1024)")
    info.add_argument("--dtype", choices=("bfloat16", "float32"), help="--pretrained SD3 / Flux: parameter and "
                                                                       "compute dtype (default bfloat16)")  # fmt: skip
    info.set_defaults(run=run_info)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (a value, a file, a path, missing data) rather than a bug: `JaxdiffError`
    only, which the library raises where it checks the user's input (argparse answers its own mistakes)."""
    return (JaxdiffError,)


LIBRARY_LOGGERS = ("absl", "orbax", "jax")


@contextlib.contextmanager
def command_logging(verbose: bool):
    """For one command: jaxdiff's messages at INFO and other libraries' (absl, orbax, jax) at WARNING on stderr;
    with `verbose`, jaxdiff's at DEBUG and everyone's at INFO. The previous logging set-up is restored after.

    The handler goes on the root logger before any library logs, so absl does not install its own; plain
    console handlers a library installed on import are set aside, so nothing is printed twice.
    """
    root = logging.getLogger()
    named = [logger, *map(logging.getLogger, LIBRARY_LOGGERS)]
    saved_levels = [(item, item.level) for item in (root, *named)]
    set_aside = [handler for handler in root.handlers if type(handler) is logging.StreamHandler]
    for handler in set_aside:
        root.removeHandler(handler)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else "%(name)s: %(message)s"
    ))  # fmt: skip
    root.addHandler(console)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        yield
    finally:
        root.removeHandler(console)
        for handler in set_aside:
            root.addHandler(handler)
        for item, level in saved_levels:
            item.setLevel(level)


def _one_line(err: BaseException) -> str:
    """The error's message on one line: lines joined by "; " (by a space after punctuation)."""
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    message = ""
    for line in filter(None, (line.strip() for line in str(text).splitlines())):
        message += ("" if not message else " " if message[-1] in ".:;," else "; ") + line
    return message or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    with command_logging(args.verbose):
        try:
            return args.run(args, extra)
        except _user_errors() as err:
            if args.verbose:
                traceback.print_exc()
            print(f"jaxdiff: error: {_one_line(err)}", file=sys.stderr)
            return 2
        except Exception as err:  # noqa: BLE001 - everything else is a bug: say so, with the traceback
            traceback.print_exc()
            print(f"jaxdiff: internal error ({type(err).__name__}: {_one_line(err)}); this is a bug, please report it",
                  file=sys.stderr)  # fmt: skip
            return 1
