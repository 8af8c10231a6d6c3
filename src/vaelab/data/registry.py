"""Named datasets: their files, sizes, SHA-256 checksums and download mirrors.

Every checksum below is copied from a published catalogue, cited next to it; none was
computed from a download of unknown origin. Two kinds of checksum exist per file:

- ``sha256``: of the file exactly as the mirrors serve it (the ``.gz`` or ``.amat``). Used
  to verify downloads and files found on disk.
- ``content_sha256``: of the decompressed idx bytes. Distributions sometimes recompress the
  official files (Debian's ``dataset-fashion-mnist`` stores the same idx bytes in a gzip
  without the original file name in its header, so the ``.gz`` hash differs); such a copy,
  or a ``gunzip``-ed one, is accepted when its decompressed bytes match ``content_sha256``.

A file whose checksum is ``None`` cannot be verified: it is accepted on its size and a
strict parse only, and that is written in the run metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import Registry

__all__ = ["RemoteFile", "DatasetSpec", "DATASETS"]


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset as the mirrors serve it.

    Attributes:
        name: file name on the mirrors, e.g. ``"train-images-idx3-ubyte.gz"``.
        size: size in bytes of the served file, or None if unknown.
        sha256: SHA-256 of the served file, or None if no published value exists.
        content_sha256: SHA-256 of the decompressed bytes, or None.
        source: where the checksums come from (repository + path or URL).
    """

    name: str
    size: int | None
    sha256: str | None
    content_sha256: str | None = None
    source: str = ""

    @property
    def stem(self) -> str:
        """The name without ``.gz``: how a decompressed copy is called."""
        return self.name[:-3] if self.name.endswith(".gz") else self.name

    @property
    def verifiable(self) -> bool:
        return self.sha256 is not None or self.content_sha256 is not None


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset.

    Attributes:
        name: registry name, also the folder name in data and cache directories.
        format: how a part's files are read (:data:`vaelab.data.formats.PART_READERS`):
            ``"idx"`` (images + labels files), ``"amat"`` (one 0/1 text file per part),
            ``"cifar10-bin"`` (the CIFAR-10 binary tar.gz), ``"svhn-mat"`` (a MAT-file).
        parts: official part (``"train"``, ``"test"``, ``"valid"``) -> its files: for idx
            ``(images, labels)``, for the others ``(file,)`` (CIFAR-10's parts share one).
        mirrors: base URLs tried in order; a file's URL is ``base + "/" + file.name``.
        image_shape: ``(C, H, W)`` of one image.
        levels: 256 for grey levels 0..255, 2 for data that is already 0/1.
        homepage, citation: for the README and reports.
        classes: label names in label order (for legends), or empty.
    """

    name: str
    format: str
    files: tuple[RemoteFile, ...]
    parts: dict[str, tuple[str, ...]]
    mirrors: tuple[str, ...]
    image_shape: tuple[int, int, int] = (1, 28, 28)
    levels: int = 256
    homepage: str = ""
    citation: str = ""
    classes: tuple[str, ...] = ()

    def file(self, name: str) -> RemoteFile:
        for remote in self.files:
            if remote.name == name:
                return remote
        raise KeyError(name)

    def files_for(self, part: str) -> tuple[RemoteFile, ...]:
        return tuple(self.file(name) for name in self.parts[part])


DATASETS: Registry[DatasetSpec] = Registry("dataset")

DIGITS = tuple(str(d) for d in range(10))

_TFDS = "tensorflow/datasets: tensorflow_datasets/url_checksums/{}.txt (sha256 + size)"
_RUBY = "ankane/torchvision-ruby: lib/torchvision/datasets/{}.rb (same sha256)"


def _idx_files(names_sizes_hashes, source: str, content=None) -> tuple[RemoteFile, ...]:
    content = content or {}
    return tuple(
        RemoteFile(name, size, sha, content.get(name), source)
        for name, size, sha in names_sizes_hashes
    )


_IDX_PARTS = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# MNIST (LeCun, Cortes & Burges). sha256 and sizes: tensorflow/datasets
# tensorflow_datasets/url_checksums/mnist.txt; identical sha256 in
# ankane/torchvision-ruby lib/torchvision/datasets/mnist.rb.
# content_sha256 (decompressed idx bytes; lets a gunzip-ed copy such as torchvision's
# MNIST/raw/ be verified): the same four values appear in many independent public projects
# (a code search found about ten each, e.g. a download manifest pairing the .gz sha256
# 440fcabf... above with "uncompressed_sha256" ba891046..., 47,040,016 bytes); the search
# tool did not name those repositories, so treat these as corroborated, not catalogued.
_MNIST_CONTENT = {
    "train-images-idx3-ubyte.gz": (
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"
    ),
    "train-labels-idx1-ubyte.gz": (
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"
    ),
    "t10k-images-idx3-ubyte.gz": (
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"
    ),
}
DATASETS.register("mnist")(
    DatasetSpec(
        name="mnist",
        format="idx",
        files=_idx_files(
            [
                (
                    "train-images-idx3-ubyte.gz",
                    9912422,
                    "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                ),
                (
                    "train-labels-idx1-ubyte.gz",
                    28881,
                    "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                ),
                (
                    "t10k-images-idx3-ubyte.gz",
                    1648877,
                    "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                ),
                (
                    "t10k-labels-idx1-ubyte.gz",
                    4542,
                    "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
                ),
            ],
            source=f"{_TFDS.format('mnist')}; {_RUBY.format('mnist')}",
            content=_MNIST_CONTENT,
        ),
        parts=_IDX_PARTS,
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist",
            "https://storage.googleapis.com/cvdf-datasets/mnist",
            "http://yann.lecun.com/exdb/mnist",
        ),
        homepage="http://yann.lecun.com/exdb/mnist/",
        citation="LeCun, Bottou, Bengio & Haffner (1998), Gradient-based learning applied "
        "to document recognition",
        classes=DIGITS,
    )
)

# Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017). sha256 and sizes of the served .gz files:
# tensorflow/datasets tensorflow_datasets/url_checksums/fashion_mnist.txt; identical sha256
# in ankane/torchvision-ruby lib/torchvision/datasets/fashion_mnist.rb.
# content_sha256 (decompressed idx bytes): computed from Debian's dataset-fashion-mnist
# 0.0~git20200523.55506a9-1 (/usr/share/datasets/fashion-mnist). Those bytes' MD5s are
# f4a8712d7a061bf5bd6d2ca38dc4d50a, 9018921c3c673c538a1fc5bad174d6f9,
# 8181f5470baa50b63fa0f6fddb340f0a, 15d484375f8d13e6eb1aabb0c3f46965 (train images, train
# labels, test images, test labels), the MD5s of the uncompressed official files published
# in torchvision-style FashionMNIST classes ("raw_data" lists next to the official .gz MD5s
# 8d4fb7e6..., 25c81989..., bef4ecab..., bb300cfd...), and the same four sha256 values
# appear as decompressed-file hashes in independent public code (a Makefile's SHA256F_*
# entries, a Rust crate downloading from the zalandoresearch GitHub mirror); the search tool
# did not name those repositories. tests/test_data_fashion.py re-checks the MD5s.
_FASHION_CONTENT = {
    "train-images-idx3-ubyte.gz": (
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"
    ),
    "train-labels-idx1-ubyte.gz": (
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"
    ),
    "t10k-images-idx3-ubyte.gz": (
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"
    ),
}
DATASETS.register("fashion-mnist")(
    DatasetSpec(
        name="fashion-mnist",
        format="idx",
        files=_idx_files(
            [
                (
                    "train-images-idx3-ubyte.gz",
                    26421880,
                    "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                ),
                (
                    "train-labels-idx1-ubyte.gz",
                    29515,
                    "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                ),
                (
                    "t10k-images-idx3-ubyte.gz",
                    4422102,
                    "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                ),
                (
                    "t10k-labels-idx1-ubyte.gz",
                    5148,
                    "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
                ),
            ],
            source=f"{_TFDS.format('fashion_mnist')}; {_RUBY.format('fashion_mnist')}",
            content=_FASHION_CONTENT,
        ),
        parts=_IDX_PARTS,
        mirrors=(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion",
        ),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
        citation="Xiao, Rasul & Vollgraf (2017), Fashion-MNIST: a novel image dataset for "
        "benchmarking machine learning algorithms, arXiv:1708.07747",
        # the label descriptions of the dataset's README, in label order
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                 "Sneaker", "Bag", "Ankle boot"),
    )
)

# Kuzushiji-MNIST (Clanuwat et al., 2018). sha256 and sizes: tensorflow/datasets
# tensorflow_datasets/url_checksums/kmnist.txt; identical sha256 in
# ankane/torchvision-ruby lib/torchvision/datasets/kmnist.rb.
DATASETS.register("kmnist")(
    DatasetSpec(
        name="kmnist",
        format="idx",
        files=_idx_files(
            [
                (
                    "train-images-idx3-ubyte.gz",
                    18165135,
                    "51467d22d8cc72929e2a028a0428f2086b092bb31cfb79c69cc0a90ce135fde4",
                ),
                (
                    "train-labels-idx1-ubyte.gz",
                    29497,
                    "e38f9ebcd0f3ebcdec7fc8eabdcdaef93bb0df8ea12bee65224341c8183d8e17",
                ),
                (
                    "t10k-images-idx3-ubyte.gz",
                    3041136,
                    "edd7a857845ad6bb1d0ba43fe7e794d164fe2dce499a1694695a792adfac43c5",
                ),
                (
                    "t10k-labels-idx1-ubyte.gz",
                    5120,
                    "20bb9a0ef54c7db3efc55a92eef5582c109615df22683c380526788f98e42a1c",
                ),
            ],
            source=f"{_TFDS.format('kmnist')}; {_RUBY.format('kmnist')}",
        ),
        parts=_IDX_PARTS,
        mirrors=(
            "https://codh.rois.ac.jp/kmnist/dataset/kmnist",
            "http://codh.rois.ac.jp/kmnist/dataset/kmnist",
        ),
        homepage="https://github.com/rois-codh/kmnist",
        citation="Clanuwat et al. (2018), Deep learning for classical Japanese literature, "
        "arXiv:1812.01718",
        # the hiragana of kmnist_classmap.csv, in label order
        classes=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
    )
)

# Binarized MNIST (Larochelle & Murray, 2011; the fixed 50k/10k/10k split used by the VAE
# and IWAE literature). sha256 and sizes: tensorflow/datasets
# tensorflow_datasets/url_checksums/binarized_mnist.txt (only one catalogue lists them).
DATASETS.register("binarized-mnist")(
    DatasetSpec(
        name="binarized-mnist",
        format="amat",
        files=tuple(
            RemoteFile(name, size, sha, None, _TFDS.format("binarized_mnist"))
            for name, size, sha in [
                (
                    "binarized_mnist_train.amat",
                    78400000,
                    "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d",
                ),
                (
                    "binarized_mnist_valid.amat",
                    15680000,
                    "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2",
                ),
                (
                    "binarized_mnist_test.amat",
                    15680000,
                    "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c",
                ),
            ]
        ),
        parts={
            "train": ("binarized_mnist_train.amat",),
            "valid": ("binarized_mnist_valid.amat",),
            "test": ("binarized_mnist_test.amat",),
        },
        mirrors=("http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist",),
        levels=2,
        homepage="http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/",
        citation="Larochelle & Murray (2011), The neural autoregressive distribution "
        "estimator, AISTATS",
    )
)

# CIFAR-10, binary version (Krizhevsky, 2009): one archive for both official parts, raw
# records, no pickle (see vaelab.data.cifar). sha256 and size: tensorflow/datasets
# tensorflow_datasets/url_checksums/cifar10.txt (TFDS downloads this binary version);
# identical sha256 in ankane/torchvision-ruby lib/torchvision/datasets/cifar10.rb
# (tgz_sha256).
DATASETS.register("cifar10")(
    DatasetSpec(
        name="cifar10",
        format="cifar10-bin",
        files=(
            RemoteFile(
                "cifar-10-binary.tar.gz",
                170052171,
                "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
                None,
                f"{_TFDS.format('cifar10')}; ankane/torchvision-ruby: "
                f"lib/torchvision/datasets/cifar10.rb (same sha256)",
            ),
        ),
        parts={"train": ("cifar-10-binary.tar.gz",), "test": ("cifar-10-binary.tar.gz",)},
        mirrors=("https://www.cs.toronto.edu/~kriz", "http://www.cs.toronto.edu/~kriz"),
        image_shape=(3, 32, 32),
        homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
        citation="Krizhevsky (2009), Learning multiple layers of features from tiny images, "
        "technical report, University of Toronto",
        classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck"),
    )
)

# SVHN, cropped digits (format 2; Netzer et al., 2011): MATLAB level-5 files read by
# vaelab.data.matfile (no SciPy). Labels 10 (digit 0) become 0. The "extra" set is not
# included. sha256 and sizes: tensorflow/datasets
# tensorflow_datasets/url_checksums/svhn_cropped.txt; identical sha256 in pytorch/vision
# torchvision/prototype/datasets/_builtin/svhn.py (_CHECKSUMS), which also gives the sizes
# 73,257 (train) and 26,032 (test) and the same X axes and label % 10 mapping.
DATASETS.register("svhn")(
    DatasetSpec(
        name="svhn",
        format="svhn-mat",
        files=tuple(
            RemoteFile(name, size, sha, None,
                       f"{_TFDS.format('svhn_cropped')}; pytorch/vision: torchvision/prototype/"
                       f"datasets/_builtin/svhn.py (same sha256)")
            for name, size, sha in [
                (
                    "train_32x32.mat",
                    182040794,
                    "435e94d69a87fde4fd4d7f3dd208dfc32cb6ae8af2240d066de1df7508d083b8",
                ),
                (
                    "test_32x32.mat",
                    64275384,
                    "cdce80dfb2a2c4c6160906d0bd7c68ec5a99d7ca4831afa54f09182025b6a75b",
                ),
            ]
        ),
        parts={"train": ("train_32x32.mat",), "test": ("test_32x32.mat",)},
        mirrors=("http://ufldl.stanford.edu/housenumbers",),
        image_shape=(3, 32, 32),
        homepage="http://ufldl.stanford.edu/housenumbers/",
        citation="Netzer, Wang, Coates, Bissacco, Wu & Ng (2011), Reading digits in natural "
        "images with unsupervised feature learning, NIPS Workshop on Deep Learning and "
        "Unsupervised Feature Learning",
        classes=DIGITS,
    )
)
