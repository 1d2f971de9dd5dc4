"""Fetch the DreamBench photos to where every default looks (`mosaic_kit.data.fetch_dreambench`).

Downloads google/dreambooth at a pinned commit (about 112 MB; or reads ``--source``, a folder or a
``.tar.gz``/``.zip`` archive of it you already have, or another DreamBench copy), downscales the
photos to 512 px as the toolkit's copy is, and writes them with their attribution and licence
files, ``prompts.json`` and ``pairs_multi.json`` into ``$MOSAIC_DREAMBENCH`` or, when that is not
set, ``~/.cache/mosaic_kit/dreambench`` (``$XDG_CACHE_HOME`` moves it). The evaluation, the
dataset recipe's default, the inference default, the PCK benchmark and the tests read it there.

Examples::

    python recipes/fetch_dreambench.py                                  # download (network)
    python recipes/fetch_dreambench.py --source ~/Downloads/dreambooth-main.zip
    python recipes/fetch_dreambench.py --source dreambooth/ --output-dir data/dreambench
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from mosaic_kit.data import DREAMBOOTH_COMMIT, fetch_dreambench
from mosaic_kit.utils.cli import RecipeArgumentParser, add_output_dir, add_progress, positive_int, usage_errors


def main(argv: list[str] | None = None) -> Path:
    parser = RecipeArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, help="a folder or archive of google/dreambooth (default: download "
                        f"commit {DREAMBOOTH_COMMIT[:7]} from GitHub)")
    add_output_dir(parser, "where to write (default: $MOSAIC_DREAMBENCH, else ~/.cache/mosaic_kit/dreambench)")
    parser.add_argument("--subjects", help="comma-separated subject folders to keep (default: all 30)")
    parser.add_argument("--max-side", type=positive_int, default=512, help="longer side of the photos (default 512)")
    parser.add_argument("--quality", type=positive_int, default=90, help="JPEG quality (default 90)")
    parser.add_argument("--photos-per-subject", type=positive_int, help="keep at most N photos per subject")
    parser.add_argument("--overwrite", action="store_true", help="replace a copy already at the output folder")
    add_progress(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with usage_errors(parser):
        output = fetch_dreambench(
            args.source, args.output_dir, subjects=args.subjects.split(",") if args.subjects else None,
            max_side=args.max_side, quality=args.quality, photos_per_subject=args.photos_per_subject,
            overwrite=args.overwrite, progress=not args.no_progress,
        )
    provenance = output / "provenance.json"
    summary = json.loads(provenance.read_text()) if provenance.is_file() else {"folder": str(output)}
    print(json.dumps({"folder": str(output), **summary}), file=sys.stderr)
    return output


if __name__ == "__main__":
    main()
