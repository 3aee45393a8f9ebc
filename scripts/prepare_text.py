"""Text files -> token files for recipes.gpt's data_file / val_file.

    python scripts/prepare_text.py SRC_DIR OUT_DIR [--val-fraction 0.05] [--glob '*.txt']

Reads the files under SRC_DIR matching --glob (in subfolders too), in sorted order of
their paths, and writes their concatenation as tokens: bytes, one uint8 each (the gpt
recipe's default token_dtype and vocab_size 256). The last --val-fraction of the tokens
(the tail of the concatenation, as the recipe splits text) goes to OUT_DIR/val.bin, the rest
to OUT_DIR/train.bin; with --val-fraction 0 only train.bin is written. Files are streamed
through in chunks, never held whole. Then train with

    launcher run configs/gpt.yaml recipe.data_file=OUT_DIR/train.bin recipe.val_file=OUT_DIR/val.bin
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

CHUNK = 8 << 20  # bytes per read and write


def text_files(src: Path, glob: str) -> list[Path]:
    return sorted((p for p in src.rglob(glob) if p.is_file()), key=lambda p: p.relative_to(src).as_posix())


def copy_range(src, dst, start: int, length: int) -> None:
    src.seek(start)
    while length:
        chunk = src.read(min(CHUNK, length))
        dst.write(chunk)
        length -= len(chunk)


def prepare(src: Path, out: Path, val_fraction: float, glob: str) -> tuple[int, int]:
    """Write out/train.bin and out/val.bin; returns their token counts."""
    files = text_files(src, glob)
    if not files:
        raise ValueError(f"no files match {glob!r} under {src}")
    out.mkdir(parents=True, exist_ok=True)
    train, val = out / "train.bin", out / "val.bin"
    tmp_train, tmp_val = out / "train.bin.tmp", out / "val.bin.tmp"  # renamed when complete
    with open(tmp_train, "w+b") as f:
        for path in files:
            with open(path, "rb") as text:
                while chunk := text.read(CHUNK):
                    f.write(chunk)
        total = f.tell()
        n_val = round(total * val_fraction)
        if n_val:  # move the tail into val.bin: the token count is known only once all is written
            with open(tmp_val, "wb") as v:
                copy_range(f, v, total - n_val, n_val)
            f.truncate(total - n_val)
    os.replace(tmp_train, train)
    if n_val:
        os.replace(tmp_val, val)
    else:
        val.unlink(missing_ok=True)  # an earlier run's val.bin would not match this train.bin
    return total - n_val, n_val


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, metavar="SRC_DIR")
    p.add_argument("out", type=Path, metavar="OUT_DIR")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="the tail of the tokens written to val.bin (default 0.05; 0: no val.bin)")
    p.add_argument("--glob", default="*.txt", help="which files under SRC_DIR, in subfolders too (default '*.txt')")
    p.add_argument("--tokenizer", choices=["bytes"], default="bytes", help="bytes: one uint8 token per byte")
    args = p.parse_args(argv)
    if not 0 <= args.val_fraction < 1:
        p.error(f"--val-fraction {args.val_fraction}: it must be in [0, 1)")
    if not args.src.is_dir():
        p.error(f"{args.src} is not a directory")
    try:
        n_train, n_val = prepare(args.src, args.out, args.val_fraction, args.glob)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out / 'train.bin'}: {n_train} tokens (uint8)")
    if n_val:
        print(f"{args.out / 'val.bin'}: {n_val} tokens (uint8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
