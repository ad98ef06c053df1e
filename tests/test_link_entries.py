"""A table entry's own link fields (issue 19): `link = {...}` on a [[methods]] entry, or `link.FIELD` in a sweep's grid,
runs that entry's units under the table's protocol with those fields replaced, keyed apart from the others."""
import pytest

from cemabench.cli import main
from cemabench.config import LINK_FIELDS
from cemabench.errors import UserError
from cemabench.run.context import TableContext
from cemabench.tables.plan import plan
from cemabench.tables.spec import load_table
from cemabench.tables.sweep import expand, load_sweep

SPEC = '''name = "linked"
title = "entries with their own link"
[protocol]
batch_size = 64
[data]
severity = 5
domains = ["fog"]
[data.miniature]
dataset = "miniature-digits-c"
edge = "mini:edge"
foundation = "mini:foundation"
[data.real]
dataset = "imagenet-c"
edge = "mini:edge"
foundation = "mini:foundation"
[[methods]]
name = "cloud-only"
[[methods]]
label = "cloud-only jpeg:75"
name = "cloud-only"
LINK
'''


def _spec(tmp_path, link='link = { input_codec = "jpeg:75" }'):
    path = tmp_path / "linked.toml"
    path.write_text(SPEC.replace("LINK", link))
    return str(path)


@pytest.mark.parametrize("link, message", [
    ('link = { setting = "continual" }', "[[methods]] #2: link cannot set setting"),
    ('link = { batch_size = 8 }', "link cannot set batch_size: the stream is the table's"),
    ('link = { input_codec = "jpeg:0" }', "[[methods]] #2: input codec 'jpeg:0': the quality must be an integer"),
    ('link = { cloud_flops_per_s = -1.0 }', "protocol cloud_flops_per_s must be a number > 0"),
])
def test_a_bad_link_is_one_line_before_any_compute(tmp_path, capsys, link, message):
    assert main(["reproduce", _spec(tmp_path, link), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_an_entrys_link_keys_its_units_apart_with_its_codecs_library(tmp_path):
    spec = load_table(_spec(tmp_path))
    assert spec.methods[1].link == {"input_codec": "jpeg:75"} and "input_codec" in LINK_FIELDS
    context = TableContext(spec, None)
    raw, coded = (task for task in plan(spec, spec.miniature, (0,)))
    assert coded.link == (("input_codec", "jpeg:75"),) and raw.link == ()
    keys = [context.unit_key(task.resolve([], context.planner)) for task in (raw, coded)]
    assert keys[0] != keys[1]
    assert "libjpeg_turbo" in context.unit_config(coded.resolve([], context.planner)) and \
        "libjpeg_turbo" not in context.unit_config(raw.resolve([], context.planner))


def test_a_sweep_grid_may_name_the_entrys_link_fields(tmp_path):
    base = tmp_path / "linked.toml"
    _spec(tmp_path)
    path = tmp_path / "codecs.toml"
    path.write_text(f'extends = "{base}"\nname = "codecs"\n[sweep]\nmethod = "cloud-only"\nreference = true\n'
                    '[sweep.grid]\n"link.input_codec" = ["png", "webp:50"]\n')
    table = expand(load_sweep(str(path)), 5)
    assert [(m.label, m.link) for m in table.methods] == [
        ("cloud-only", {}), ("cloud-only link.input_codec=png", {"input_codec": "png"}),
        ("cloud-only link.input_codec=webp:50", {"input_codec": "webp:50"})]
    path.write_text(f'extends = "{base}"\nname = "codecs"\n[sweep]\nmethod = "cloud-only"\n'
                    '[sweep.grid]\n"link.input_codec" = ["gif"]\n')
    with pytest.raises(UserError, match="grid link.input_codec: unknown input codec 'gif'"):
        load_sweep(str(path))


def test_a_misspelt_link_field_is_named_as_unknown_not_as_the_streams():
    from cemabench.config import Protocol, with_link

    with pytest.raises(UserError, match="link has no field inputcodec; it may set"):
        with_link(Protocol(), {"inputcodec": "png"})
    with pytest.raises(UserError, match="link cannot set batch_size: the stream is the table's"):
        with_link(Protocol(), {"batch_size": 8})
