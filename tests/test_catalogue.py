"""The method catalogue (`layerscope methods`) lists exactly the registered methods."""

from typer.testing import CliRunner

from pipeline.catalogue import METHODS, registered
from pipeline.cli import app

ARRAYS = {"logits", "penultimate", "head", "label", "layer", "grad", "map", "image", "energy", "gram", "odin",
          "rankfeat"}


def test_every_registered_method_says_what_it_reads_and_nothing_else_is_listed():
    assert set(METHODS) == registered()


def test_reads_name_store_arrays_and_per_layer_methods_are_the_detectors_and_layered_scores():
    from pipeline.detectors import available_detectors

    assert all(set(m.reads) <= ARRAYS and m.reads and m.paper for m in METHODS.values())
    assert {n for n, m in METHODS.items() if m.per_layer} == {*available_detectors(), "energy", "nac_ue"}


def test_methods_command_prints_every_method():
    result = CliRunner().invoke(app, ["methods"], terminal_width=250, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for name in ("gradnorm", "mahalanobis_pp", "openmax", "knn_l2", "energy"):
        assert f" {name} " in result.output
    assert "Huang, Geng & Li, NeurIPS 2021" in result.output
    assert "each new setting costs a pass through the network" in " ".join(result.output.split())
