"""`divtri bench --suite tabular` on a user's own labelled files."""

import json

import numpy as np
import pandas as pd
import pytest

from anomaly import LatentEBMDetector
from evaluation import cli
from evaluation.user_data import DataError, anomaly_labels, load_labelled_table
from tests.conftest import TINY


def _table(n_normal=120, n_anomalies=12, seed=0) -> pd.DataFrame:
    rng = np.random.RandomState(seed)
    X = np.vstack([rng.normal(size=(n_normal, 4)), rng.normal(loc=4, size=(n_anomalies, 4))])
    frame = pd.DataFrame(X, columns=["temp", "pressure", "flow", "speed"])
    frame["state"] = ["ok"] * n_normal + ["fault"] * n_anomalies
    return frame


def _bench(data, out, *extra):
    return cli.main(["bench", "--suite", "tabular", "--data", str(data), "--out", str(out),
                     "--methods", "triangle,lof", "--epochs", "2",
                     "--detector-params", json.dumps(TINY),
                     *extra])


@pytest.mark.slow
def test_tabular_suite_on_csv_and_parquet_with_a_string_label(tmp_path, capsys):
    frame = _table()
    data = tmp_path / "my data"
    data.mkdir()
    frame.to_csv(data / "pump 3 (2024).csv", index=False)
    frame.to_parquet(data / "pump-3_copy.parquet")
    out = tmp_path / "res"
    assert _bench(data, out, "--label-column", "state", "--anomaly-label", "fault") == 0
    printed = capsys.readouterr().out
    assert "triangle vs" in printed  # the paired table
    result = pd.read_csv(out / "tabular" / "tabular.csv")
    assert set(result.dataset) == {"pump 3 (2024)", "pump-3_copy"}
    by_file = result.pivot_table(index="method", columns="dataset", values="auroc")
    # the same rows read from CSV and from parquet give the same numbers
    np.testing.assert_allclose(by_file["pump 3 (2024)"], by_file["pump-3_copy"])
    assert by_file.loc["lof"].min() > 0.9  # the anomalies are 4 standard deviations out
    for name in ("summary.md", "paired_auroc.csv", "auroc_per_dataset.csv"):
        assert (out / "tabular" / name).is_file()
    assert list((out / "tabular").glob("*_roc_pr.png"))
    model = LatentEBMDetector.load(out / "tabular" / "models" / "pump 3 (2024)")
    assert model.score_samples(frame.drop(columns="state").to_numpy()).shape == (132,)


@pytest.mark.slow
def test_npz_and_csv_of_the_same_set_agree(tmp_path):
    frame = _table(seed=1)
    X = frame.drop(columns="state").to_numpy()
    y = (frame.state == "fault").to_numpy(int)
    np.savez(tmp_path / "set.npz", X=X, y=y)
    frame.assign(state=y).to_csv(tmp_path / "set.csv", index=False)
    for name in ("set.npz", "set.csv"):
        assert _bench(tmp_path / name, tmp_path / name.replace(".", "_"),
                      "--label-column", "state", "--seeds", "0,1") == 0
    npz = pd.read_csv(tmp_path / "set_npz" / "tabular" / "tabular.csv")
    csv = pd.read_csv(tmp_path / "set_csv" / "tabular" / "tabular.csv")
    assert len(npz) == len(csv) > 2
    np.testing.assert_allclose(npz.auroc, csv.auroc)


def test_semi_supervised_protocol_fits_on_normal_rows_only(tmp_path):
    # A tight cluster of anomalies: in the unlabelled training rows they are each other's
    # neighbours and look normal to LOF; fitted on normal rows only, LOF finds them.
    rng = np.random.RandomState(0)
    X = np.vstack([rng.normal(size=(200, 3)), 4 + 0.05 * rng.normal(size=(60, 3))])
    np.savez(tmp_path / "clustered.npz", X=X, y=np.r_[np.zeros(200), np.ones(60)])
    auroc = {}
    for protocol in ("unsupervised", "semi-supervised"):
        assert _bench(tmp_path / "clustered.npz", tmp_path / protocol, "--methods", "lof",
                      "--protocol", protocol) == 0
        auroc[protocol] = pd.read_csv(tmp_path / protocol / "tabular" / "tabular.csv").auroc[0]
    assert auroc["semi-supervised"] > 0.95 > auroc["unsupervised"] + 0.2


def _bad_input_cases(tmp_path):
    good = _table()
    cases = {}

    def write(name, frame, **kwargs):
        path = tmp_path / name
        frame.to_csv(path, index=False, **kwargs)
        return path

    cases["no label column"] = (write("a.csv", good), [], "name the label column")
    cases["misspelt label"] = (write("b.csv", good), ["--label-column", "stat"],
                               "no column 'stat'; the columns are")
    cases["one class"] = (write("c.csv", good.assign(state="ok")),
                          ["--label-column", "state"], "exactly two values")
    cases["three values"] = (write("d.csv", good.assign(state=np.arange(len(good)) % 3)),
                             ["--label-column", "state"], "Map them to two")
    cases["string labels, no mapping"] = (write("e.csv", good), ["--label-column", "state"],
                                          "--anomaly-label")
    cases["unknown anomaly label"] = (write("f.csv", good), ["--label-column", "state",
                                                             "--anomaly-label", "bad"],
                                      "is not a label value")
    cases["text feature"] = (write("g.csv", good.assign(site="north")),
                             ["--label-column", "state", "--anomaly-label", "fault"],
                             "non-numeric feature columns ['site']")
    with_nan = good.copy()
    with_nan.loc[3, "flow"] = np.nan
    cases["NaN cell"] = (write("h.csv", with_nan), ["--label-column", "state",
                                                    "--anomaly-label", "fault"],
                         "missing or infinite values in columns ['flow']")
    cases["too few anomalies"] = (write("i.csv", _table(n_anomalies=1)),
                                  ["--label-column", "state", "--anomaly-label", "fault"],
                                  "at least 2")
    empty = tmp_path / "j.csv"
    empty.write_text("")
    cases["empty file"] = (empty, ["--label-column", "state"], "no rows")
    cases["header only"] = (write("k.csv", good.iloc[:0]), ["--label-column", "state"],
                            "no rows")
    cases["unknown drop column"] = (write("l.csv", good), ["--label-column", "state",
                                                           "--drop-columns", "id"],
                                    "--drop-columns names ['id']")
    cases["no such file"] = (tmp_path / "missing.csv", [], "no such file")
    cases["unknown method"] = (write("m.csv", good), ["--label-column", "state",
                                                      "--anomaly-label", "fault",
                                                      "--methods", "lof,iforest"],
                               "unknown methods ['iforest']")
    return cases


def test_bad_inputs_give_one_clear_line_and_write_nothing(tmp_path, capsys):
    cases = _bad_input_cases(tmp_path)
    for case, (path, extra, message) in cases.items():
        out = tmp_path / f"out-{case}"
        args = ["bench", "--suite", "tabular", "--data", str(path), "--out", str(out), *extra]
        if "--methods" not in extra:
            args += ["--methods", "lof"]
        assert cli.main(args) == 2, case
        error = capsys.readouterr().err
        assert message in error, (case, error)
        assert error.count("\n") == 1 and "Traceback" not in error, case
        assert not out.exists(), case


def test_text_columns_can_be_dropped(tmp_path):
    frame = _table().assign(site="north", row_id=range(132))
    frame.to_csv(tmp_path / "t.csv", index=False)
    X, y = load_labelled_table(tmp_path / "t.csv", label_column="state", anomaly_label="fault",
                               drop_columns=("site", "row_id"))
    assert X.shape == (132, 4) and y.sum() == 12


def test_label_mapping():
    np.testing.assert_array_equal(anomaly_labels([0, 1, 1], source="s"), [0, 1, 1])
    np.testing.assert_array_equal(anomaly_labels([True, False], source="s"), [1, 0])
    np.testing.assert_array_equal(anomaly_labels([-1, 1, 1], source="s", anomaly_label="-1"),
                                  [1, 0, 0])
    with pytest.raises(DataError, match="not 0/1"):
        anomaly_labels([-1, 1], source="s")
    with pytest.raises(DataError, match="1 rows have no label"):
        anomaly_labels(pd.Series([0, None, 1]), source="s")



def test_a_row_id_column_is_flagged(tmp_path, caplog):
    _table().assign(row_id=range(132)).to_csv(tmp_path / "t.csv", index=False)
    load_labelled_table(tmp_path / "t.csv", label_column="state", anomaly_label="fault")
    assert "'row_id' holds a different, ordered integer" in caplog.text
    caplog.clear()
    load_labelled_table(tmp_path / "t.csv", label_column="state", anomaly_label="fault",
                        drop_columns=("row_id",))
    assert "row id" not in caplog.text
