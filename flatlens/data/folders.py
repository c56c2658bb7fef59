"""DomainBed's on-disk image datasets, read from local folders (never downloaded).

Layout (DomainBed's ``MultipleEnvironmentImageFolder``): ``<root>/<DATASET_DIR>/<domain>/<class>/<image>``.
Domains are taken in sorted folder order, as DomainBed does, so ``test_envs`` indices mean the same
thing in both tools. Class indices come from the sorted union of class-folder names.

Transforms are DomainBed's: evaluation = Resize to ``image_size`` + ToTensor + ImageNet Normalize;
training (training batches only, when ``data.augment``) = RandomResizedCrop(scale 0.7-1) +
HorizontalFlip + ColorJitter(0.3, 0.3, 0.3, 0.3) + RandomGrayscale + ToTensor + Normalize. Unlike
DomainBed, validation (``out``) splits are never augmented (SWAD's fix). Each augmented sample uses its
own seed, so augmentation is reproducible whatever the number of workers or processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from flatlens.data.base import Domain, MultiDomainDataset
from flatlens.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class FolderLayout:
    """Where a DomainBed dataset lives under ``data.root`` and its domain folders (sorted)."""

    directory: str
    domains: tuple[str, ...]


LAYOUTS: dict[str, FolderLayout] = {
    "PACS": FolderLayout("PACS", ("art_painting", "cartoon", "photo", "sketch")),
    "VLCS": FolderLayout("VLCS", ("Caltech101", "LabelMe", "SUN09", "VOC2007")),
    "OfficeHome": FolderLayout("office_home", ("Art", "Clipart", "Product", "Real World")),
    "TerraIncognita": FolderLayout("terra_incognita", ("location_100", "location_38", "location_43", "location_46")),
    "DomainNet": FolderLayout("domain_net", ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")),
}


def build_transforms(image_size: int, train: bool):
    """DomainBed's evaluation or training transform for ``image_size`` inputs."""
    from torchvision import transforms as T

    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if not train:
        return T.Compose([T.Resize((image_size, image_size)), T.ToTensor(), normalize])
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(0.7, 1.0)),
        T.RandomHorizontalFlip(),
        T.ColorJitter(0.3, 0.3, 0.3, 0.3),
        T.RandomGrayscale(),
        T.ToTensor(),
        normalize,
    ])


class FolderDomain(Domain):
    """One domain folder: ``<domain>/<class>/<image>`` files, loaded lazily with PIL."""

    def __init__(self, name: str, files: list[Path], labels: list[int], image_size: int, augment: bool) -> None:
        self.name = name
        self.files = files
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.image_size = image_size
        self.augment = augment
        self._eval_tf = None
        self._train_tf = None

    def _load_one(self, i: int, aug_seed: int | None) -> Tensor:
        from PIL import Image, UnidentifiedImageError

        path = self.files[i]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"cannot read image {path}: {exc}; remove or replace the file") from None
        if aug_seed is None or not self.augment:
            if self._eval_tf is None:
                self._eval_tf = build_transforms(self.image_size, train=False)
            return self._eval_tf(img)
        if self._train_tf is None:
            self._train_tf = build_transforms(self.image_size, train=True)
        with torch.random.fork_rng(devices=[]):  # torchvision draws from the global RNG: isolate it
            torch.manual_seed(int(aug_seed))
            return self._train_tf(img)

    def load(self, indices: Tensor, aug_seeds: Tensor | None = None) -> tuple[Tensor, Tensor]:
        idx = indices.tolist()
        seeds = aug_seeds.tolist() if aug_seeds is not None else [None] * len(idx)
        x = torch.stack([self._load_one(i, s) for i, s in zip(idx, seeds)])
        return x, self.labels[indices]

    def fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256()
        for f, y in zip(self.files, self.labels.tolist()):
            h.update(f"{f.parent.name}/{f.name}:{y};".encode())
        return h.hexdigest()[:16]


def _layout_help(name: str, layout: FolderLayout | None) -> str:
    if layout is None:
        return "expected <root>/<domain>/<class>/<image files>"
    return (f"expected <root>/{layout.directory}/<domain>/<class>/<image files> with domains "
            f"{', '.join(layout.domains)}; set data.root to the folder that contains {layout.directory}/")


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def folder_dataset(name: str, root: str, image_size: int = 224, augment: bool = True) -> MultiDomainDataset:
    """Read a DomainBed dataset (``name`` in LAYOUTS) or any domain/class/image tree (``folders``)."""
    if not root:
        raise DataError(f"data.root is empty: {name} is read from local folders; " + _layout_help(name, LAYOUTS.get(name)))
    layout = LAYOUTS.get(name)
    base = Path(root).expanduser()
    ds_dir = base / layout.directory if layout else base
    if not ds_dir.is_dir():
        raise DataError(f"{name} not found at {ds_dir}: " + _layout_help(name, layout))
    if layout:
        missing = [d for d in layout.domains if not (ds_dir / d).is_dir()]
        if missing:
            raise DataError(f"{name} at {ds_dir} lacks domain folder(s) {', '.join(missing)}: " + _layout_help(name, layout))
        domain_names = sorted(layout.domains)
    else:
        domain_names = sorted(p.name for p in ds_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        if len(domain_names) < 2:
            raise DataError(f"{ds_dir} has {len(domain_names)} domain folder(s); a DG dataset needs at least 2: "
                            + _layout_help(name, None))
    class_sets = {d: sorted(p.name for p in (ds_dir / d).iterdir() if p.is_dir()) for d in domain_names}
    classes = sorted(set().union(*class_sets.values()))
    if not classes:
        raise DataError(f"{ds_dir} has no class folders inside its domains: " + _layout_help(name, layout))
    class_index = {c: i for i, c in enumerate(classes)}
    domains: list[Domain] = []
    for d in domain_names:
        files, labels = [], []
        for c in class_sets[d]:
            imgs = _list_images(ds_dir / d / c)
            files += imgs
            labels += [class_index[c]] * len(imgs)
        if not files:
            raise DataError(f"domain folder {ds_dir / d} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        domains.append(FolderDomain(d, files, labels, image_size, augment))
    return MultiDomainDataset(
        name=name, domains=domains, num_classes=len(classes), input_shape=(3, image_size, image_size),
        class_names=classes, info={"root": str(ds_dir.resolve()), "transforms": "domainbed", "augment": augment},
    )
