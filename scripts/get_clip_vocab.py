"""Take CLIP's BPE vocabulary file out of the open-clip-torch wheel, without installing the package
(its dependencies pull torchvision). Usage: python scripts/get_clip_vocab.py WHEEL OUT_GZ"""

import os
import sys
import zipfile
from pathlib import Path

MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"


def main(wheel: str, out: str) -> None:
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        if MEMBER not in zf.namelist():
            sys.exit(f"{wheel}: has no {MEMBER}; pick an open-clip-torch wheel that ships the CLIP vocabulary")
        tmp = out_path.with_name(out_path.name + ".tmp")
        tmp.write_bytes(zf.read(MEMBER))
        os.replace(tmp, out_path)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
