"""Pictures that explain: titled grids and stage strips, curves with labelled reference lines."""


from smi_plugin import InversionConfig, SparseInverter
from smi_plugin.visualize import (
    grid_titles,
    save_curves,
    save_grid,
    save_stage_strip,
    stage_titles,
)


def _batch(tiny_vit):
    inverter = SparseInverter(tiny_vit, InversionConfig(iterations=4, schedule="1:0.5,2:0.5"), progress=False)
    return inverter.invert([0, 3, 9], snapshots=True)


def test_grid_and_strip_are_written_with_class_names_and_kept_fractions(tmp_path, tiny_vit):
    from PIL import Image

    batch = _batch(tiny_vit)
    names = [f"class-{i}" for i in range(10)]
    titles = grid_titles(batch, names)
    kept = batch.patch_mask.flatten(1).float().mean(1)
    assert titles == [f"{names[label]} · {fraction:.0%} kept" for label, fraction in zip([0, 3, 9], kept.tolist())]
    assert grid_titles(batch)[1].startswith("class 3")  # no names known: the index
    path = save_grid(batch, tmp_path / "grid.png", class_names=names)
    assert path.is_file() and Image.open(path).size[0] > 100
    assert save_grid(batch, tmp_path / "dense.png", nrow=2, masked=False).is_file()  # the old call still works
    stages = stage_titles(batch)
    masks = [mask[0] for _, _, mask in batch.snapshots]
    assert len(stages) == len(batch.snapshots) and stages[0].startswith(f"it {batch.snapshots[0][0]}:")
    assert stages[-1].endswith(f"{int(masks[-1].sum())}/{masks[-1].numel()} "
                               f"({int(masks[-1].sum()) / masks[-1].numel():.0%})")
    assert save_stage_strip(batch, tmp_path / "strip.png", index=0, scale=6).is_file()


def test_curves_take_labelled_reference_lines(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = []
    original = plt.Figure.savefig

    def spy(fig, *args, **kwargs):
        shown.extend(fig.axes[0].get_legend_handles_labels()[1])
        return original(fig, *args, **kwargs)

    plt.Figure.savefig = spy
    try:
        path = save_curves({"student": [(0, 0.1), (10, 0.5)]}, tmp_path / "curve.png", xlabel="step", ylabel="top-1",
                           references={"teacher": 0.83, "chance": 0.1})
    finally:
        plt.Figure.savefig = original
    assert path.is_file() and shown == ["student", "teacher (0.83)", "chance (0.1)"]
    assert save_curves({"a": [(0, 1.0)]}, tmp_path / "plain.png", xlabel="x", ylabel="y").is_file()
