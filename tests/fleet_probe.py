"""What a Ray cluster holds of a fleet, asked by a driver of its own (the test's process may
already be a driver of another Ray):

    RAY_ADDRESS=host:port python -m tests.fleet_probe FLEET

Prints one JSON object: `fleet`, the fleet's named actors (name -> actor id); `stats`, each
one's counters from `info()` (requests served, cache hits); `hosts`, every
`ModelHost` actor of the cluster that is not dead, named or not, with its pid, restarts, node and
whether it is detached (a gateway's private actors would show up here too); `nodes`, the CPUs of
each live node.
"""

from __future__ import annotations

import json
import sys

import ray
from ray._private.state import actors

from lodestar.orchestrator.worker_pool import fleet_namespace


def probe(fleet: str) -> dict:
    namespace = fleet_namespace(fleet)
    named = ray.util.list_named_actors(all_namespaces=True)
    names = sorted(a["name"] for a in named if a["namespace"] == namespace)
    hosts = [
        {
            "id": a["ActorID"],
            "name": a["Name"],
            "state": a["State"],
            "pid": a["Pid"],
            "restarts": a["NumRestarts"],
            "node": a["Address"]["NodeID"],
            "detached": a["IsDetached"],
        }
        for a in actors().values()
        if a["ActorClassName"] == "ModelHost" and a["State"] != "DEAD"
    ]
    handles = {n: ray.get_actor(n, namespace=namespace) for n in names}
    infos = ray.get([h.info.remote() for h in handles.values()], timeout=120)
    return {
        "fleet": {n: h._actor_id.hex() for n, h in handles.items()},
        "stats": {n: info["stats"] for n, info in zip(handles, infos, strict=True)},
        "hosts": sorted(hosts, key=lambda h: h["name"]),
        "nodes": {n["NodeID"]: n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]},
    }


if __name__ == "__main__":
    ray.init(address="auto", log_to_driver=False)
    print(json.dumps(probe(sys.argv[1])))
