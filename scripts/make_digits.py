"""Write scikit-learn's bundled digits as a class-per-folder PNG tree plus a small ViT to train VPT on, offline."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny import build_tiny_vit, write_digits  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="build/digits", help="folder to write train/, test/ and vit/ into")
    out = Path(parser.parse_args().out)
    write_digits(out)
    build_tiny_vit(out / "vit")
    print(f"wrote {out}/train, {out}/test (8x8 digit PNGs, one folder per class) and {out}/vit")


if __name__ == "__main__":
    main()
