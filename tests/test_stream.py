from smi_plugin import InversionConfig, distillation_stream


def test_stream_gives_distinct_samples_per_shard_and_process(tiny_vit):
    from datasets.distributed import split_dataset_by_node
    from torch.utils.data import DataLoader

    config = InversionConfig(iterations=2, batch_size=2, schedule="1:0.5")
    stream = distillation_stream(tiny_vit, config, labels=list(range(8)), seed=3, num_shards=4, with_logits=True)
    assert stream.num_shards == 4
    ranks = [list(split_dataset_by_node(stream, rank=r, world_size=2)) for r in range(2)]
    keys = [{(row["item"], row["label"]) for row in rows} for rows in ranks]
    assert len(keys[0]) == len(keys[1]) == 4 and not keys[0] & keys[1]
    assert sorted(label for _, label in keys[0] | keys[1]) == list(range(8))
    batch = next(iter(DataLoader(stream.with_format("torch"), batch_size=8)))
    assert batch["pixel_values"].shape == (8, 3, 32, 32) and batch["patch_mask"].shape == (8, 8, 8)
    assert batch["teacher_logits"].shape == (8, 10) and batch["patch_mask"].sum(dim=(1, 2)).tolist() == [32] * 8


def test_stream_module_and_distill_share_the_functions():
    from smi_plugin import distill, stream

    assert distill.distillation_stream is stream.distillation_stream
    assert distill.stream_from_inverted is stream.stream_from_inverted
