"""`sdtrain-export`: the command line of `sdtrain.artifacts.export` (its docstring is the --help)."""

from __future__ import annotations

import argparse

from sdtrain.artifacts import checkpoint
from sdtrain.artifacts import export as export_module
from sdtrain.artifacts.export import EXPORT, EXPORTED, export, export_single_file
from sdtrain.artifacts.outputs import check_file, check_folder
from sdtrain.runtime import quiet


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=export_module.__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("ckpt", help="a .ckpt written by sdtrain-train")
    p.add_argument("out", nargs="?", help="diffusers folder to write (optional with --single-file)")
    p.add_argument("--no-ema", dest="ema", action="store_false", help="export the raw weights")
    p.add_argument("--pretrained", help="model folder, if the one the run used has moved")
    p.add_argument("--single-file", help="also (or only) write this original-layout .safetensors")
    p.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16", help="--single-file's")
    p.add_argument("--single-file-config", help="configs folder of a run that trained from a file")
    p.add_argument("--lora", action="store_true", help="a LoRA run: OUT gets its LoRA files only")
    p.add_argument(
        "--embedding",
        action="store_true",
        help="a textual-inversion run: OUT gets one embedding .safetensors per token only",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export at OUT/FILE")
    p.add_argument("--verbose", action="store_true", help="show other libraries' loading bars")
    return p


def main(argv: list[str] | None = None) -> None:
    p = parser()
    a = p.parse_args(argv)
    if a.out is None and a.single_file is None:
        p.error("give OUT (a diffusers folder), --single-file FILE.safetensors, or both")
    if a.lora and a.embedding:
        p.error("--lora and --embedding each fill OUT: export them to two folders")
    if a.embedding and a.out is None:
        p.error("--embedding writes its files into OUT: give OUT")
    quiet.apply(verbose=a.verbose)  # no loading bars, no torchvision notice
    try:
        run(a)
    except checkpoint.CheckpointError as e:
        raise SystemExit(
            f"sdtrain-export: {e}; pass a .ckpt that sdtrain-train wrote "
            "(<run folder>/checkpoints/last.ckpt)"
        ) from e
    except (OSError, KeyError, ValueError) as e:
        raise SystemExit(f"sdtrain-export: {e}") from e
    finally:
        quiet.restore()


def run(a: argparse.Namespace) -> None:
    # every target checked before the checkpoint is read: a refusal costs nothing, writes nothing
    if a.single_file:
        check_file(a.single_file, a.overwrite, ".safetensors")
    if a.out is not None:
        check_folder(a.out, a.overwrite, EXPORTED, EXPORT)
    if a.single_file:
        args = (a.ema, a.pretrained, a.single_file_config, a.dtype, a.overwrite)
        print(f"wrote {export_single_file(a.ckpt, a.single_file, *args)}")
    if a.out is None:
        return
    args = (a.ema, a.pretrained, a.single_file_config, a.overwrite)
    if a.lora:
        from sdtrain.artifacts.export_lora import export_lora

        print("wrote", *export_lora(a.ckpt, a.out, *args))
        return
    if a.embedding:
        from sdtrain.artifacts.export_embedding import export_embedding

        print("wrote", *export_embedding(a.ckpt, a.out, *args))
        return
    print(f"wrote {export(a.ckpt, a.out, *args)}")


if __name__ == "__main__":
    main()
