"""The store's batch reader: the batch order of the previous reader kept exactly (streamed or held in memory), errors
of the background reading thread raised in the consumer, and the thread stopped when the consumer stops."""

import threading

import pytest
import torch

from convlens.activations.store import ActivationStore, store_from_tensors
from convlens.core.errors import ConvlensError
from convlens.runtime.seeding import torch_generator


def previous_batches(store, batch_size, split="train", *, shuffle=True, seed=0, epoch=0, window=4):
    """The reader before shards were read in a background thread (a copy): the order every run so far used."""
    order = (
        torch.randperm(len(store.shards), generator=torch_generator(seed, "shards", epoch)).tolist()
        if shuffle
        else list(range(len(store.shards)))
    )
    carry = None
    for start in range(0, len(order), window):
        vectors = [
            store._select(store.read_shard(i, ("vectors", "split")), split)["vectors"]
            for i in order[start : start + window]
        ]
        pool = torch.cat(([carry] if carry is not None else []) + vectors)
        if shuffle:
            pool = pool[torch.randperm(len(pool), generator=torch_generator(seed, "pool", epoch, start))]
        full = len(pool) // batch_size * batch_size
        yield from pool[:full].split(batch_size)
        carry = pool[full:]
    if carry is not None and len(carry):
        yield carry


def reader_threads():
    return [thread for thread in threading.enumerate() if thread.name == "convlens-store-reader"]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """11 shards of 97 samples (the last 30), about a fifth of them validation, scattered over every shard."""
    vectors = torch.randn(1000, 6, generator=torch.Generator().manual_seed(0))
    split = (torch.rand(1000, generator=torch.Generator().manual_seed(1)) < 0.2).to(torch.uint8)
    return store_from_tensors(tmp_path_factory.mktemp("mixed") / "store", vectors, split=split, samples_per_shard=97)


@pytest.mark.parametrize("split", ["train", "val", None])
def test_batches_come_in_the_order_of_the_previous_reader_streamed_or_held_in_memory(mixed, split):
    resident = mixed.load_into_memory(split, "cpu")
    compared = 0
    for shuffle in (True, False):
        for batch_size in (1, 7, 64, 300):
            for window in (1, 3, 4, 20):
                for seed, epoch in ((0, 0), (3, 2)):
                    options = {"shuffle": shuffle, "seed": seed, "epoch": epoch, "window": window}
                    # the previous reader gave an empty batch for a window smaller than a batch, on which the trainer
                    # failed (a division by zero); there are no empty batches any more
                    expected = [b for b in previous_batches(mixed, batch_size, split, **options) if len(b)]
                    streamed = list(mixed.batches(batch_size, split, **options))
                    held = list(mixed.batches(batch_size, split, resident=resident, **options))
                    assert len(streamed) == len(held) == len(expected)
                    for want, got, got_held in zip(expected, streamed, held):
                        assert torch.equal(want, got) and torch.equal(want, got_held)
                    compared += len(expected)
    assert compared > 1000 and not reader_threads()


def test_a_split_held_in_memory_holds_every_sample_of_the_split(mixed):
    resident = mixed.load_into_memory("train", "cpu")
    assert torch.equal(resident.vectors, mixed.split("train")["vectors"])
    assert sum(resident.counts) == len(resident.vectors) and resident.starts[0] == 0
    with pytest.raises(ConvlensError, match="train samples of .* cannot give the val samples"):
        next(mixed.batches(8, "val", resident=resident))


def test_half_precision_stores_read_as_before(tmp_path):
    vectors = torch.randn(300, 5, generator=torch.Generator().manual_seed(2)).to(torch.float16)
    store = store_from_tensors(tmp_path / "store", vectors, split=(torch.arange(300) % 4 == 0), samples_per_shard=70)
    for split in ("train", "val"):
        expected = [batch for batch in previous_batches(store, 32, split, seed=5) if len(batch)]
        got = list(store.batches(32, split, seed=5))
        assert [b.dtype for b in got] == [torch.float16] * len(expected)
        assert all(torch.equal(want, batch) for want, batch in zip(expected, got, strict=True))


def corrupt(store, number):
    path = store.path / store.shards[number]["file"]
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def test_an_error_in_the_reading_thread_is_raised_in_the_consumer_after_the_earlier_batches(tmp_path):
    vectors = torch.randn(400, 4, generator=torch.Generator().manual_seed(3))
    store_from_tensors(tmp_path / "store", vectors, samples_per_shard=50)  # 8 shards: windows of 4 and 4
    corrupt(ActivationStore(tmp_path / "store"), 6)
    store = ActivationStore(tmp_path / "store")
    got = []
    with pytest.raises(ConvlensError, match=r"shard shards/shard-00006\.safetensors of .* is corrupted"):
        for batch in store.batches(50, None, shuffle=False):
            got.append(batch)
    assert torch.equal(torch.cat(got), vectors[:200]) and not reader_threads()

    (tmp_path / "store" / store.shards[6]["file"]).unlink()
    with pytest.raises(ConvlensError, match=r"shard shards/shard-00006\.safetensors of .* is missing"):
        list(ActivationStore(tmp_path / "store").batches(50, None, shuffle=False))
    assert not reader_threads()


def test_a_malformed_shard_read_without_checksums_is_one_message(tmp_path):
    store_from_tensors(tmp_path / "store", torch.randn(100, 4), samples_per_shard=50)
    store = ActivationStore(tmp_path / "store", verify=False)
    (tmp_path / "store" / store.shards[1]["file"]).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ConvlensError, match=r"cannot read shard shards/shard-00001\.safetensors of .*"):
        list(store.batches(10, None))
    with pytest.raises(ConvlensError, match=r"cannot read shard shards/shard-00001\.safetensors of .*"):
        store.read_shard(1)


def test_non_finite_vectors_are_refused_when_held_in_memory_too(tmp_path):
    vectors = torch.randn(60, 3)
    vectors[45, 2] = float("inf")
    store = store_from_tensors(tmp_path / "store", vectors, samples_per_shard=20)
    with pytest.raises(ConvlensError, match=r"shard shards/shard-00002\.safetensors .*1 non-finite"):
        store.load_into_memory("train", "cpu")
    assert not reader_threads()


def test_stopping_early_stops_the_reading_thread(tmp_path):
    store = store_from_tensors(tmp_path / "store", torch.randn(2000, 4), samples_per_shard=100)
    batches = store.batches(10, None)
    first = next(batches)
    assert first.shape == (10, 4) and len(reader_threads()) == 1
    batches.close()
    assert not reader_threads()
    for number, _ in enumerate(store.batches(10, None)):
        if number == 3:
            break
    assert not reader_threads()
