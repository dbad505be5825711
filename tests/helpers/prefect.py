"""Prefect's API, as the flow tests read it."""
import httpx


def flow_logs(stack: dict, flow_run_id: str) -> str:
    """The flow run's logs as Prefect's API (`stack["api"]`) stores them (what its UI shows)."""
    messages, offset = [], 0
    while True:
        response = httpx.post(f"{stack['api']}/logs/filter", timeout=10, json={
            "logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200, "offset": offset, "sort": "TIMESTAMP_ASC"})
        response.raise_for_status()
        page = response.json()
        messages += [entry["message"] for entry in page]
        if len(page) < 200:
            return "\n".join(messages)
        offset += 200
