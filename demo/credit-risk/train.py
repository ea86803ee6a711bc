"""Train a credit-default classifier on the applicants dataset (runs inside an Animus Run).

Reads the input mounted at $ANIMUS_INPUTS_DIR/applicants, logs metrics through animus_run,
and writes the model and its evaluation to $ANIMUS_OUTPUT_DIR. Deterministic: the same
inputs, code and environment give byte-identical outputs.
"""

import argparse
import csv
import json
import os
from pathlib import Path

import animus_run
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler


def load(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], rows[1:]
    data = np.array(body, dtype=float)
    return data[:, :-1], data[:, -1].astype(int), header[:-1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--c", type=float, default=1.0, help="inverse regularization strength")
    parser.add_argument("--max-iter", type=int, default=200)
    args = parser.parse_args()

    inputs = Path(os.environ["ANIMUS_INPUTS_DIR"]) / "applicants"
    output = Path(os.environ["ANIMUS_OUTPUT_DIR"])
    features, labels, names = load(inputs / "applicants.csv")
    print(f"loaded {len(labels)} applicants, {int(labels.sum())} defaults")
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=0.25, random_state=0, stratify=labels
    )
    scaler = StandardScaler().fit(x_train)
    model = LogisticRegression(C=args.c, max_iter=args.max_iter)
    # Fit in stages so the run shows a learning curve.
    for step, iterations in enumerate((5, 20, args.max_iter), start=1):
        model.set_params(max_iter=iterations)
        model.fit(scaler.transform(x_train), y_train)
        loss = log_loss(y_test, model.predict_proba(scaler.transform(x_test)))
        animus_run.log_metric("test_log_loss", round(float(loss), 6), step=step)
        print(f"step {step}: {iterations} iterations, test log loss {loss:.4f}")
    scores = model.predict_proba(scaler.transform(x_test))[:, 1]
    metrics = {
        "auc": round(float(roc_auc_score(y_test, scores)), 6),
        "accuracy": round(float(accuracy_score(y_test, scores > 0.5)), 6),
    }
    for name, value in metrics.items():
        animus_run.log_metric(name, value)
    model_doc = {
        "kind": "logistic_regression",
        "features": names,
        "scaler_mean": [round(float(v), 10) for v in scaler.mean_],
        "scaler_scale": [round(float(v), 10) for v in scaler.scale_],
        "coef": [round(float(v), 10) for v in model.coef_[0]],
        "intercept": round(float(model.intercept_[0]), 10),
        "C": args.c,
    }
    (output / "model.json").write_text(json.dumps(model_doc, indent=2, sort_keys=True) + "\n")
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    print(f"auc {metrics['auc']}, accuracy {metrics['accuracy']}")


if __name__ == "__main__":
    main()
