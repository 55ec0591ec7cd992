"""Wall time of one caption training epoch with a frozen encoder: features from the feature
cache against images decoded every epoch (and against images from the uint8 image store).

All three runs train the same decoder (forward, backward, clip, Adam) on the same COCO-layout
fixture (``training.coco.write_coco_fixture``: rendered scenes as JPEGs) in one process; the
encoder is the frozen torchvision ResNet at ``--image-size``. The one-off cost of building
the caches is printed too. Ratios > 1: the cache is faster.

    python bench/bench_feature_cache.py [--images 96] [--image-size 224] [--encoder resnet18]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from bbservice.models.caption import CaptionConfig, CaptionModel
from training.caption_data import CaptionTrainDataset, collate_train
from training.coco import load_coco, write_coco_fixture
from training.feature_cache import FeatureCache
from training.image_store import ImageStore


def one_epoch(model: CaptionModel, dataset, batch_size: int, features: bool) -> float:
    """Seconds for one epoch; ``features``: the dataset yields encoder features already."""
    optimizer = torch.optim.Adam(model.decoder.parameters(), lr=1e-3)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        collate_fn=collate_train,
        generator=torch.Generator().manual_seed(0),
    )
    model.train()
    start = time.perf_counter()
    for x, captions, lengths, _ in loader:
        if features:
            outputs = model.decoder(x, captions, lengths)
        else:
            outputs = model(x, captions, lengths)
        loss = model.loss(outputs, captions, lengths).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96, help="training images")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--gate", default="bbeta5")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_coco_fixture(tmp / "coco", {"train": args.images, "val": 1, "test": 1})
        corpus = load_coco(data, min_count=1)
        items = corpus.splits["train"]
        paths = [it.image_path for it in items]
        config = CaptionConfig(
            vocab_size=len(corpus.vocab),
            encoder=args.encoder,
            image_size=args.image_size,
            hidden_size=args.hidden,
            gate=args.gate,
        )
        torch.manual_seed(0)
        model = CaptionModel.build(config)
        size = args.image_size

        decoded = CaptionTrainDataset(items, corpus.vocab, image_size=size, cache=False)
        started = time.perf_counter()
        store = ImageStore.build(paths, size, tmp / "cache", progress=False)
        store_build = time.perf_counter() - started
        started = time.perf_counter()
        cache = FeatureCache.build(config, model.encoder, store, paths, tmp / "cache")
        cache_build = time.perf_counter() - started
        from_store = CaptionTrainDataset(items, corpus.vocab, image_size=size)
        from_store.images = store
        from_cache = CaptionTrainDataset(items, corpus.vocab, image_size=size)
        from_cache.images = cache

        t_decode = one_epoch(model, decoded, args.batch_size, features=False)
        t_store = one_epoch(model, from_store, args.batch_size, features=False)
        t_cache = one_epoch(model, from_cache, args.batch_size, features=True)

    print(
        f"{len(items)} images at {size} px, frozen {args.encoder}, {args.gate} decoder "
        f"(hidden {args.hidden}), batch {args.batch_size}, {torch.get_num_threads()} threads"
    )
    print(f"decode images every epoch : {t_decode:8.1f} s / epoch")
    print(
        f"uint8 image store         : {t_store:8.1f} s / epoch  (built once in {store_build:.1f} s)"
    )
    print(
        f"fp16 feature cache        : {t_cache:8.1f} s / epoch  (built once in {cache_build:.1f} s)"
    )
    print(
        f"feature cache speed-up: {t_decode / t_cache:.1f}x against decoding, "
        f"{t_store / t_cache:.1f}x against the image store"
    )


if __name__ == "__main__":
    main()
