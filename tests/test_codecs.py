"""Input codecs on the link (issue 19): an uploaded input is charged at the length of a real bitstream that Pillow
writes with the documented settings, and the cloud gets exactly what that bitstream decodes to."""
import io

import numpy as np
import pytest
import torch
import zstandard
from PIL import Image, JpegImagePlugin

from cemabench.config import Protocol
from cemabench.config.codecs import parse_input_codec
from cemabench.datasets.miniature import clean_test_images
from cemabench.errors import UserError
from cemabench.method import EdgeDecision
from cemabench.protocol.codecs import InputCodec, library_versions, zstd_rows
from cemabench.protocol.link import Link, encode

SETTINGS = {"png": {"format": "PNG", "compress_level": 6},
            "jpeg:75": {"format": "JPEG", "quality": 75, "subsampling": 2},
            "webp:50": {"format": "WEBP", "quality": 50, "method": 4}}


@pytest.fixture(scope="module")
def images():
    """Eight images of the miniature's clean test split, float (N, 3, 32, 32) in [0, 1], as the edge sees them."""
    return torch.from_numpy(clean_test_images()[:8]).permute(0, 3, 1, 2).float().div(255)


def _pillow(image: torch.Tensor, codec: str, path) -> tuple[int, np.ndarray]:
    """Pillow alone, outside cemabench: the file it writes for one image, and what the file decodes to."""
    pixels = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(pixels).save(path, **SETTINGS[codec])
    with Image.open(path) as decoded:
        return path.stat().st_size, np.asarray(decoded.convert("RGB"))


@pytest.mark.parametrize("codec", list(SETTINGS))
def test_the_link_charges_each_input_at_its_bitstreams_length_and_the_cloud_gets_its_decoding(images, codec,
                                                                                            tmp_path):
    link = Link(None, 0, protocol=Protocol(input_codec=codec))
    upload = link.send_up(images, EdgeDecision(logits=None, upload=torch.tensor([5, 0, 3])), 3072, 0)
    files = [_pillow(images[i], codec, tmp_path / f"{i}.{codec[:4]}") for i in (5, 0, 3)]
    assert link.counters.upload_bytes == sum(size for size, _ in files) == link.total_bytes
    assert link.counters.uploaded == 3 and upload.index.tolist() == [5, 0, 3]
    expected = torch.from_numpy(np.stack([pixels for _, pixels in files])).permute(0, 3, 1, 2).float() / 255
    assert upload.samples.dtype == images.dtype and torch.equal(upload.samples, expected)
    counters, sizes, _ = link.next_domain()
    assert sizes == [size for size, _ in files] and counters.upload_bytes == sum(sizes)
    if codec == "png":  # lossless: the cloud gets the very images
        assert torch.equal(upload.samples, images[[5, 0, 3]])
    else:
        assert sum(sizes) < 3 * 3072 and not torch.equal(upload.samples, images[[5, 0, 3]])


def test_jpeg_is_baseline_4_2_0_without_metadata_as_documented(images):
    data = InputCodec("jpeg:75").encode_batch(images[:1])[0]
    with Image.open(io.BytesIO(data)) as image:
        assert JpegImagePlugin.get_sampling(image) == 2 and not image.info.get("progressive")
        assert "exif" not in image.info and "icc_profile" not in image.info
    assert InputCodec("jpeg:75").encode_batch(images[:1])[0] == data  # the same bytes every time


def test_a_byte_budget_admits_the_first_inputs_whose_encoded_lengths_fit(images):
    sizes = [len(s) for s in InputCodec("jpeg:75").encode_batch(images)]
    budget = sum(sizes[:5]) + sizes[5] - 1  # five fit, the sixth misses by one byte
    link = Link(None, 0, budget_bytes=budget, protocol=Protocol(input_codec="jpeg:75"))
    upload = link.send_up(images, EdgeDecision(logits=None, upload=torch.arange(8)), 3072, 0)
    assert upload.index.tolist() == [0, 1, 2, 3, 4] and link.counters.upload_bytes == sum(sizes[:5])
    assert link.counters.refused == 3 and link.counters.refused_bytes == sum(sizes[5:])
    # only what crossed reaches the cloud: a tensor of its own, with no room for the refused images
    assert upload.samples.untyped_storage().nbytes() == upload.samples.numel() * upload.samples.element_size()


def test_raw_charges_pixels_as_before_and_a_payload_only_upload_sends_no_image(images):
    raw = Link(None, 0)
    upload = raw.send_up(images, EdgeDecision(logits=None, upload=torch.tensor([1, 2])), 3072, 0)
    assert raw.counters.upload_bytes == 6144 and torch.equal(upload.samples, images[[1, 2]])
    assert raw.next_domain()[1] is None  # raw inputs have no per-input sizes to report
    coded = Link(None, 0, protocol=Protocol(input_codec="png"))
    decision = EdgeDecision(logits=None, upload=torch.tensor([1]), send_input=False,
                            payload={"f": torch.ones(8, 4)}, payload_dtype="float16")
    upload = coded.send_up(images, decision, 3072, 0)
    assert len(upload.samples) == 0 and coded.counters.upload_bytes == 0 and coded.counters.upload_payload_bytes == 8


@pytest.mark.parametrize("text, message", [
    ("gif", "unknown input codec 'gif': one of raw, png, jpeg:Q, webp:Q"),
    ("jpeg", "input codec 'jpeg' needs a quality"), ("jpeg:0", "must be an integer 1-100"),
    ("webp:101", "must be an integer 1-100"), ("jpeg:075", "must be an integer 1-100"),
    ("png:9", "png takes no quality"), ("JPEG:75", "unknown input codec")])
def test_a_bad_codec_is_one_sentence(text, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        Protocol(input_codec=text)


def test_the_codec_grammar_and_the_libraries_it_records():
    assert parse_input_codec("webp:9") == ("webp", 9) and parse_input_codec("raw") == ("raw", None)
    assert library_versions("raw") == {} and set(library_versions("jpeg:75")) == {"pillow", "libjpeg_turbo"}
    assert set(library_versions("png")) == {"pillow", "zlib"} and set(library_versions("webp:75")) == {"pillow", "webp"}


def test_a_one_channel_image_is_greyscale_and_other_channel_counts_are_refused():
    grey = torch.arange(64, dtype=torch.float32).reshape(1, 1, 8, 8) / 255
    codec = InputCodec("png")
    assert torch.equal(codec.decode_batch(codec.encode_batch(grey), like=grey), grey)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        codec.encode_batch(torch.zeros(1, 4, 8, 8))


def test_entropy_coded_payload_decodes_to_the_int8_values_at_its_frames_length():
    torch.manual_seed(0)
    features = torch.relu(torch.randn(6, 16, 4, 4))  # post-ReLU: many zero symbols, which entropy coding squeezes
    int8, int8_bytes = encode(features, "int8")
    coded, coded_bytes = encode(features, "int8+zstd")
    assert torch.equal(coded, int8)  # lossless over the int8 symbols: the cloud gets the int8 encoding's values
    scale = features.reshape(6, -1).amax(1) / 127
    q = torch.round(features / scale.reshape(-1, 1, 1, 1)).to(torch.int8)
    frames = zstd_rows(q, scale)  # the frames, independently decoded with zstandard, hold the scale and symbols
    assert coded_bytes.tolist() == [len(f) for f in frames] and (coded_bytes < int8_bytes).all()
    raw = zstandard.ZstdDecompressor().decompress(frames[2])
    assert raw[:4] == np.float32(scale[2]).tobytes() and raw[4:] == q[2].numpy().tobytes()


def test_the_link_charges_each_payload_row_at_its_own_length_under_a_byte_budget():
    torch.manual_seed(1)
    rows = torch.relu(torch.randn(4, 64)) * torch.tensor([[1.0], [0.0], [1.0], [1.0]])  # row 1: all zeros
    _, sizes = encode(rows, "int8+zstd")
    link = Link(None, 0, budget_bytes=int(sizes[:3].sum()))
    decision = EdgeDecision(logits=None, upload=torch.arange(4), send_input=False, payload={"f": rows},
                            payload_dtype="int8+zstd")
    upload = link.send_up(torch.zeros(4, 3, 2, 2), decision, 12, 0)
    assert upload.index.tolist() == [0, 1, 2] and link.counters.upload_payload_bytes == sizes[:3].sum()
    assert link.counters.refused_bytes == sizes[3] and sizes[1] < sizes[0]


def test_a_raw_input_carries_no_more_than_its_uint8_pixels(images):
    """Issue 19 review: an edge that packs three images' pixels into the float mantissas of the batch it was handed
    sent them for the price of one image's uint8 pixels. Raw inputs cross as round(255 x) / 255."""
    packed = images.clone()
    packed[0] += (images[1] + images[2] * 256) / 255 / 65536  # below 1/255: only the mantissa carries it
    link = Link(None, 0)
    upload = link.send_up(packed, EdgeDecision(logits=None, upload=torch.tensor([0, 3])), 3072, 0)
    assert torch.equal(upload.samples, images[[0, 3]]) and link.counters.upload_bytes == 2 * 3072


@pytest.mark.parametrize("dtype", ["int8", "int8+zstd", "float16"])
def test_payload_rows_of_no_values_cost_nothing_and_do_not_fail(dtype):
    decoded, sizes = encode(torch.zeros(3, 0), dtype)
    assert decoded.shape == (3, 0) and sizes.tolist() == [0, 0, 0]


def test_a_codec_in_a_reproduce_flag_names_files_without_a_colon():
    from cemabench.cli import variant
    from cemabench.tables.spec import load_table

    spec = variant(load_table("table2"), {"input_codec": "jpeg:75", "setting": None})
    assert spec.name == "table2.input_codec-jpeg-75" and spec.protocol.input_codec == "jpeg:75"


def test_run_through_a_codec_that_uploads_nothing_prints_no_bytes_per_input(capsys):
    """A new user's crash: `run --method source --input-codec webp:75` ended in a traceback (no input, no mean)."""
    from cemabench.cli import main

    assert main(["run", "--method", "source", "--domains", "fog", "--input-codec", "webp:75"]) == 0
    out = capsys.readouterr().out
    assert "Bytes per uploaded input as webp:75, mean:" in out and "| fog  | -" in out
