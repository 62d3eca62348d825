"Fast tests of the rule-based CheXpert-style labeler (mlrg.labeler)."

import time

import numpy as np
import pandas as pd
import pytest

from mlrg.core import InputError
from mlrg.labeler import (
    OBSERVATIONS,
    agreement_table,
    apply_policy,
    extract_changes,
    iu_xray_path,
    label_cli,
    label_frame,
    label_reports,
    label_text,
    load_iu_xray,
    mesh_to_observations,
)


def lab(text):
    return {o: v for o, v in zip(OBSERVATIONS, label_text(text)) if v == v}


@pytest.mark.parametrize(
    "text,obs",
    [
        ("No pleural effusion.", "Pleural Effusion"),
        ("The lungs are without evidence of pneumothorax.", "Pneumothorax"),
        ("Lungs are free of consolidation.", "Consolidation"),
        ("Pneumothorax has resolved.", "Pneumothorax"),
        ("Atelectasis is not seen.", "Atelectasis"),
        ("No evidence of pulmonary edema.", "Edema"),
    ],
)
def test_negation(text, obs):
    got = lab(text)
    assert got[obs] == 0
    assert got["No Finding"] == 1


@pytest.mark.parametrize(
    "text,obs",
    [
        ("Opacity may represent atelectasis.", "Atelectasis"),
        ("Pneumonia cannot be excluded.", "Pneumonia"),
        ("Possible small left effusion.", "Pleural Effusion"),
    ],
)
def test_uncertainty(text, obs):
    got = lab(text)
    assert got[obs] == -1
    assert "No Finding" not in got


def test_versus_and_differential():
    assert lab("Left basilar atelectasis versus consolidation.") == {"Atelectasis": -1, "Consolidation": -1}
    assert lab("Bibasilar atelectasis or pneumonia.") == {"Atelectasis": -1, "Pneumonia": -1}
    # a negation before the list covers it
    got = lab("No atelectasis or pneumonia.")
    assert got["Atelectasis"] == 0 and got["Pneumonia"] == 0
    assert lab("There is no focal opacity to suggest pneumonia.")["Pneumonia"] == 0


def test_several_mentions():
    assert lab("No pleural effusion. Small right pleural effusion.")["Pleural Effusion"] == 1
    assert lab("Possible atelectasis. No atelectasis elsewhere.")["Atelectasis"] == -1


def test_pericardial_is_not_pleural():
    got = lab("Small pericardial effusion.")
    assert "Pleural Effusion" not in got and got == {"No Finding": 1}


def test_devices():
    for t in ["ET tube 4 cm above the carina.", "Right PICC line ends in the SVC.", "Left chest wall pacemaker."]:
        assert lab(t) == {"Support Devices": 1, "No Finding": 1}, t
    for t in ["The trachea is midline.", "Linear atelectasis at the left base.", "A visceral pleural line is seen."]:
        assert "Support Devices" not in lab(t), t
    assert lab("The endotracheal tube has been removed.")["Support Devices"] == 0


def test_no_finding():
    assert lab("No acute cardiopulmonary process.") == {"No Finding": 1}
    assert lab("Heart size is normal. The lungs are clear. No pleural effusion or pneumothorax.") == {
        "Cardiomegaly": 0,
        "Lung Opacity": 0,
        "Pleural Effusion": 0,
        "Pneumothorax": 0,
        "No Finding": 1,
    }
    assert "No Finding" not in lab("Mild cardiomegaly.")
    assert lab("") == {}


def test_scope_break_and_post_scope():
    got = lab("No effusion but there is mild edema.")
    assert got["Pleural Effusion"] == 0 and got["Edema"] == 1
    got = lab("The effusion is unchanged and the pneumothorax has resolved.")
    assert got["Pleural Effusion"] == 1 and got["Pneumothorax"] == 0
    assert lab("No change in the moderate right effusion.")["Pleural Effusion"] == 1


def test_attribute_mentions():
    assert lab("The heart is mildly enlarged.")["Cardiomegaly"] == 1
    assert lab("The heart is not enlarged.")["Cardiomegaly"] == 0
    assert lab("Heart size is borderline.")["Cardiomegaly"] == -1
    got = lab("Normal heart size, mildly enlarged mediastinum.")
    assert got["Cardiomegaly"] == 0 and got["Enlarged Cardiomediastinum"] == 1


def test_label_reports_shape_and_policy():
    a = label_reports(["Mild cardiomegaly.", "Possible pneumonia.", "No edema."])
    assert a.shape == (3, 14)
    p = OBSERVATIONS.index("Pneumonia")
    assert apply_policy(a, "positive")[1, p] and not apply_policy(a, "negative")[1, p]
    with pytest.raises(InputError, match="uncertain_policy"):
        apply_policy(a, "sometimes")


@pytest.mark.parametrize(
    "text,expected",
    [
        ("New right lower lobe consolidation.", {"Consolidation": "new"}),
        ("Interval increase in the left pleural effusion.", {"Pleural Effusion": "worse"}),
        ("Enlarging left upper lobe nodule.", {"Lung Lesion": "worse"}),
        ("Pulmonary edema has improved.", {"Edema": "better"}),
        ("Smaller left effusion.", {"Pleural Effusion": "better"}),
        ("Moderate cardiomegaly is unchanged.", {"Cardiomegaly": "unchanged"}),
        ("No change in the small right effusion.", {"Pleural Effusion": "unchanged"}),
        ("The right pneumothorax has resolved.", {"Pneumothorax": "resolved"}),
        ("Interval removal of the endotracheal tube.", {"Support Devices": "resolved"}),
        ("Interval placement of a right PICC line.", {"Support Devices": "new"}),
        ("No new consolidation.", {}),
        ("Heart size is normal.", {}),
    ],
)
def test_extract_changes(text, expected):
    assert extract_changes(text) == expected


def test_cli_round_trip(tmp_path):
    src, dst = tmp_path / "reports.csv", tmp_path / "labels.csv"
    pd.DataFrame({"id": [7, 8, 9], "Report": ["No effusion.", "Possible pneumonia. ET tube in place.", ""]}).to_csv(
        src, index=False
    )
    assert label_cli(["--in", str(src), "--out", str(dst)]) == 0
    got = pd.read_csv(dst)
    assert list(got.columns) == ["id", "Report", *OBSERVATIONS]
    assert got["id"].tolist() == [7, 8, 9]
    assert got.loc[0, "Pleural Effusion"] == 0.0 and got.loc[0, "No Finding"] == 1.0
    assert (
        got.loc[1, "Pneumonia"] == -1.0 and got.loc[1, "Support Devices"] == 1.0 and np.isnan(got.loc[1, "No Finding"])
    )
    assert got.loc[2, OBSERVATIONS].isna().all()
    raw = dst.read_text().splitlines()
    assert raw[1].endswith(",0.0,,,,1.0,0.0,,,,") or ",1.0," in raw[1]
    # other text column name
    pd.DataFrame({"Text": ["Mild cardiomegaly."]}).to_csv(src, index=False)
    assert label_cli(["--in", str(src), "--out", str(dst), "--text-column", "Text"]) == 0
    assert pd.read_csv(dst).loc[0, "Cardiomegaly"] == 1.0
    assert label_frame(pd.DataFrame({"r": ["No edema."]}), "r").loc[0, "Edema"] == 0


def test_bad_input(tmp_path):
    out = tmp_path / "out.csv"
    with pytest.raises(InputError, match="not found"):
        label_cli(["--in", str(tmp_path / "missing.csv"), "--out", str(out)])
    src = tmp_path / "r.csv"
    src.write_text("id,Text\n1,No effusion.\n", encoding="utf-8")
    with pytest.raises(InputError, match="'Report'") as e:
        label_cli(["--in", str(src), "--out", str(out)])
    assert str(src) in str(e.value)
    src.write_bytes(b"id,Report\n1,ok\n2,caf\xe9 au lait\n")
    with pytest.raises(InputError, match=r"line 3") as e:
        label_cli(["--in", str(src), "--out", str(out)])
    assert "UTF-8" in str(e.value)
    assert not out.exists()
    with pytest.raises(InputError, match="no column"):
        label_frame(pd.DataFrame({"a": ["x"]}), "Report")


def test_agreement_table_counts():
    pred = np.zeros((3, 14), bool)
    i = OBSERVATIONS.index("Edema")
    pred[[0, 1], i] = True
    t = agreement_table(pred, [{"Edema"}, set(), {"Edema"}], ["Edema"])
    assert t.loc[0, ["tp", "fp", "fn"]].tolist() == [1, 1, 1]
    assert abs(t.loc[0, "f1"] - 0.5) < 1e-9
    assert mesh_to_observations(["Pulmonary Atelectasis/base/left", "Calcified Granuloma"]) == {"Atelectasis"}


@pytest.mark.skipif(
    iu_xray_path() is None, reason="torchxrayvision is not installed: no IU X-Ray reports to validate on"
)
def test_iu_xray_micro_f1():
    t0 = time.perf_counter()
    iu = [r for r in load_iu_xray() if (r["findings"] + r["impression"]).strip()]
    if time.perf_counter() - t0 > 10:
        pytest.skip("reading IU X-Ray took > 10 s here; the notebook and benchmark report it")
    pred = label_reports([r["findings"] + " " + r["impression"] for r in iu])
    truth = [mesh_to_observations(r["mesh"]) for r in iu]
    obs = [o for o in OBSERVATIONS if o != "No Finding" and any(o in s for s in truth)]
    micro = agreement_table(apply_policy(pred, "positive"), truth, obs).iloc[-2]["f1"]
    assert len(iu) > 3000
    assert micro >= 0.80, micro
