"""ServerApp: SeedStrategy with centralized evaluation; writes result.json when `out` is set."""
import dataclasses
import json
import os

from flwr.app import Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fwdkern.fl.flower.strategy import SeedStrategy

from .task import accuracy, load_model, load_rows

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    rows, names = load_rows(cfg["data"], cfg["text-column"], cfg["label-column"])
    model, tok = load_model(cfg["model"], len(names))
    strategy = SeedStrategy.from_model(model, optimizer="fedadam", lr=float(cfg["lr"]),
                                       perturbations=int(cfg["perturbations"]),
                                       clients_per_round=int(cfg["clients-per-round"]))
    test = rows[::5]

    def evaluate(server_round, arrays):
        sd = arrays.to_torch_state_dict()
        for n, p in model.named_parameters():
            if n in sd:
                p.data.copy_(sd[n])
        return MetricRecord({"accuracy": accuracy(model, tok, test, int(cfg["max-length"]))})

    result = strategy.start(grid=grid, initial_arrays=SeedStrategy.arrays_of(model),
                            num_rounds=int(cfg["num-rounds"]), evaluate_fn=evaluate)
    if cfg["out"]:
        os.makedirs(cfg["out"], exist_ok=True)
        acc = {int(r): float(m["accuracy"]) for r, m in result.evaluate_metrics_serverapp.items()}
        info = [dataclasses.asdict(h) for h in strategy.history]
        with open(os.path.join(cfg["out"], "result.json"), "w") as f:
            json.dump({"accuracy": acc, "rounds": info, "rejections": strategy.server.rejections}, f)
