"""Print (or write into README.md between the gm-code markers) gm.code before/after LoRA for one site.

Usage: python tools/readme_code.py [--write]
"""

from __future__ import annotations

import re
import sys

import fxpeft
from fxpeft import zoo


def _lines_for(code: str, needle: str, context: int = 0) -> list[str]:
    lines = code.splitlines()
    keep = [i for i, line in enumerate(lines) if needle in line]
    return [lines[i].strip() for i in sorted({j for i in keep for j in range(i, i + 1 + context)}) if j < len(lines)]


def snippet() -> str:
    model, _, kwargs = zoo.tiny_llama(layers=1)
    gm = fxpeft.trace(model, kwargs=kwargs)
    before = [ln for ln in gm.code.splitlines() if "q_proj" in ln and "=" in ln]
    fxpeft.rewrite(gm, fxpeft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj"]))
    after = [ln for ln in gm.code.splitlines() if "q_proj" in ln and "=" in ln]
    # The generated code frees dead values (`x = None`); that bookkeeping is noise in a README.
    clean = lambda lines: [re.sub(r";\s+[\w ,=]+= None$", "", ln.strip()) for ln in lines]
    return ("Before (`fxpeft.trace`, torch.export dialect):\n\n```python\n" + "\n".join(clean(before)) +
            "\n```\n\nAfter `fxpeft.rewrite(gm, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, "
            "target_modules=[\"q_proj\"]))`:\n\n```python\n" + "\n".join(clean(after)) + "\n```\n")


if __name__ == "__main__":
    text = snippet()
    if "--write" in sys.argv:
        readme = open("README.md").read()
        start, end = "<!-- gm-code:start -->\n", "<!-- gm-code:end -->"
        i, j = readme.index(start) + len(start), readme.index(end)
        open("README.md", "w").write(readme[:i] + text + readme[j:])
    print(text)
