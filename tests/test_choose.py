"""`grokquant plan` without a recipe: every candidate's size, which fit, the best by measured quality."""

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from grokquant.cli import main
from grokquant.gguf.convert import convert, file_bytes, needs_imatrix
from grokquant.grok.checkpoint import Checkpoint
from grokquant.grok.config import GrokConfig
from grokquant.grok.tokenizer import load_tokenizer
from grokquant.quantize.recipe import GGUFRecipe
from grokquant.runtime.choose import MEASURED_KLD, best, candidates, choose
from grokquant.runtime.placement import GiB

DOCS = Path(__file__).resolve().parent.parent / "docs" / "quality.md"


def test_one_24gib_gpu_and_64gib_ram_names_a_recipe_that_fits():
    result = CliRunner().invoke(main, ["plan", "--gpu", "24GiB", "--ram", "64GiB"])
    assert result.exit_code == 0, result.output
    pick = re.search(r"best that fits: (\S+) \(([\d.]+) GB", result.output)
    assert pick, result.output
    for name in candidates():  # every candidate is listed with its size
        assert re.search(rf"^{re.escape(name)} +(GGUF|GPTQ) +[\d.]+", result.output, re.M), name
    assert "DOES NOT FIT" not in result.output and "llama.cpp: -c 4096 -ngl" in result.output
    assert float(pick[2]) * 1e9 < (24 + 64) * GiB


def test_the_best_is_the_lowest_measured_kld_that_fits():
    choices = choose(GrokConfig(), 24 * GiB, 1, 64 * GiB)
    pick = best(choices)
    fitting = [c for c in choices if c.fits and c.kld is not None]
    assert pick.kld == min(c.kld for c in fitting)
    # more memory never gives a worse pick
    assert best(choose(GrokConfig(), 24 * GiB, 2, 192 * GiB)).kld <= pick.kld
    # the order is quality, not size: some pick in the list is smaller than a recipe it is ranked above
    ranked = [c for c in choices if c.kld is not None]
    assert any(a.report.file_bytes < b.report.file_bytes for i, a in enumerate(ranked) for b in ranked[i + 1:])


def test_a_recipe_that_does_not_fit_shows_what_does():
    result = CliRunner().invoke(main, ["plan", "--recipe", "q8_0", "--gpu", "24GiB", "--ram", "64GiB"])
    assert result.exit_code == 2
    assert "DOES NOT FIT" in result.output and "best that fits:" in result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: q8_0 does not fit") and "the best that fits is" in last


def test_nothing_fits_is_one_line():
    result = CliRunner().invoke(main, ["plan", "--gpu", "1GiB", "--ram", "2GiB"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("error: no measured recipe fits")


@pytest.mark.parametrize("ftype", ["q4_k_m", "q2_k", "iq4_xs", "iq3_s", "iq2_xxs", "iq1_s", "iq1_m"])
def test_planned_size_is_what_convert_writes(tiny_tp8, tmp_path, ftype):
    """At small widths the header is a visible share of the file: with the checkpoint's tokenizer the plan
    counts it exactly; without it (the real model's default) the estimate stays within 2%."""
    import torch

    ckpt = Checkpoint.open(tiny_tp8)
    cfg, tok = ckpt.config, load_tokenizer(ckpt.tokenizer_path)
    recipe = GGUFRecipe(ftype, ftype)
    imatrix = None
    if needs_imatrix(cfg, recipe):
        from grokquant.gguf.convert import plan

        imatrix = {t.name: torch.ones(t.shape[0] if len(t.shape) == 3 else 1, t.shape[-1])
                   for t in plan(cfg, recipe, True) if t.type.name != "F32"}
    path = convert(tiny_tp8, tmp_path / f"{ftype}.gguf", recipe, imatrix=imatrix)[0]
    written = path.stat().st_size
    assert file_bytes(cfg, recipe, tok, imatrix is not None) == written
    assert abs(file_bytes(cfg, recipe, None, imatrix is not None) / written - 1) < 0.02
    result = CliRunner().invoke(main, ["plan", str(tiny_tp8), "--recipe", ftype, "--gpus", "0", "--ram", "1GiB"])
    assert result.exit_code == 0, result.output


def test_measured_kld_is_the_table_in_docs():
    """The order plan recommends by is the one docs/quality.md reports (llama.cpp rows for GGUF files)."""
    text = DOCS.read_text()
    section = text[text.index("## Every file type and recipe"):]
    section = section[:section.index("\n## ", 4)] if "\n## " in section[4:] else section
    found = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) >= 6 and cells[1] in ("llama.cpp", "torch (GPTQ)"):
            found[cells[0]] = float(cells[5])
    assert found == MEASURED_KLD
    assert set(MEASURED_KLD) <= set(candidates())
