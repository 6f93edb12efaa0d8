"""COCO caption metrics (pycocoevalcap BLEU, ROUGE-L, CIDEr, METEOR) over a whole prediction set at once."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
from collections.abc import Iterator

from raycap.text import standardize

Result = dict[str, float | str | int]


@contextlib.contextmanager
def _quiet_java() -> Iterator[None]:
    """Java's PTBTokenizer reports its speed on the stderr it inherits: point file descriptor 2 at /dev/null."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _tokenize_ptb(captions: dict[str, list[str]]) -> dict[str, list[str]]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    with contextlib.redirect_stdout(io.StringIO()), _quiet_java():
        out = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    # The tokenizer drops trailing empty lines, so only an empty last caption may come back missing.
    if any(k not in out and any(c.strip() for c in v) for k, v in captions.items()):
        raise OSError("PTBTokenizer returned fewer captions than it was given")
    return {k: out.get(k, [""] * len(v)) for k, v in captions.items()}


def caption_scores(gts: dict[str, list[str]], res: dict[str, str], java: bool | None = None) -> Result:
    """BLEU-1..4, ROUGE-L, CIDEr (and METEOR with java) of `res` against `gts`, over the whole set at once.

    With java (found on PATH when `java` is None) captions go through pycocoevalcap's PTBTokenizer and
    METEOR is computed; without it, the stated fallback tokenisation is `raycap.text.standardize`.
    """
    if not res:
        raise ValueError("no predictions to score")
    if set(gts) != set(res):
        raise ValueError("references and predictions must cover the same images")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    use_java = shutil.which("java") is not None if java is None else java
    tokenizer = "standardize"
    if use_java:
        try:
            gts_tok = _tokenize_ptb(gts)
            res_tok = {k: v[0] for k, v in _tokenize_ptb({k: [c] for k, c in res.items()}).items()}
            tokenizer = "ptb"
        except OSError:
            use_java = False
    if tokenizer == "standardize":
        gts_tok = {k: [standardize(c) for c in v] for k, v in gts.items()}
        res_tok = {k: standardize(c) for k, c in res.items()}
    hyp = {k: [c] for k, c in res_tok.items()}
    out: Result = {"images": len(res), "tokenizer": tokenizer}
    with contextlib.redirect_stdout(io.StringIO()):
        bleu, _ = Bleu(4).compute_score(gts_tok, hyp, verbose=0)
        out.update({f"BLEU-{i + 1}": float(b) for i, b in enumerate(bleu)})
        out["ROUGE-L"] = float(Rouge().compute_score(gts_tok, hyp)[0])
        out["CIDEr"] = float(Cider().compute_score(gts_tok, hyp)[0])
        if use_java:
            from pycocoevalcap.meteor.meteor import Meteor

            meteor = Meteor()
            out["METEOR"] = float(meteor.compute_score(gts_tok, hyp)[0])
            del meteor  # stops the java process
    return out
