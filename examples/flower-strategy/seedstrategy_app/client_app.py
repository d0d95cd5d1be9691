"""ClientApp: answers SeedStrategy's plans with jvp scalars (fwdkern.fl.flower.strategy.answer_plan)."""
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fwdkern.fl.flower.codec import plan_from_record
from fwdkern.fl.flower.strategy import answer_plan

from .task import client_batches, load_model, load_rows

app = ClientApp()
_CACHE = {}


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = context.run_config
    if "model" not in _CACHE:
        rows, names = load_rows(cfg["data"], cfg["text-column"], cfg["label-column"])
        _CACHE["model"], _CACHE["tok"] = load_model(cfg["model"], len(names))
        _CACHE["rows"] = rows
    plan = plan_from_record(msg.content["plan"])
    batches = client_batches(_CACHE["rows"], _CACHE["tok"], int(context.node_config["partition-id"]),
                             int(context.node_config.get("num-partitions", 2)), plan.round,
                             int(cfg["batch-size"]), int(cfg["max-length"]))
    # context.state keeps the node's copy of the tensors between messages: downloads stay seeds and scalars
    return answer_plan(msg, _CACHE["model"], batches, state=context.state)
