"""The campaign half of `scripts/demo.sh`: ten contacts with mixed outcomes (the Twilio
emulator's dial plan, written by demo.sh, decides who answers), run as a campaign against
the local service, then the results CSV printed.

It talks to the service over HTTP like any client. Of ours, imports only: nothing.
"""

from __future__ import annotations

import os
import sys
import time

import httpx

BASE = "http://127.0.0.1:8000"
CSV = """phone,first_name
+14155550101,Ann
+14155550102,Bob
+14155550103,Cy
+14155550104,Dee
+14155550105,Eve
+14155550106,Fay
+14155550107,Gus
+14155550108,Hal
+14155550109,Ivy
+14155550110,Jo
"""


def main() -> int:
    key = os.environ.get("API_KEYS", "demo-key").split(",")[0]
    with httpx.Client(
        base_url=BASE, headers={"Authorization": f"Bearer {key}"}, timeout=30
    ) as http:
        for _ in range(300):
            try:
                if http.get("/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        agent = http.post(
            "/v1/agents",
            json={
                "name": "Campaign demo",
                "first_message": "Hi {{first_name}}, this is Acme about your demo request.",
                "voicemail": {
                    "action": "leave_message",
                    "message": "Hi {{first_name}}, call Acme back.",
                },
                "disclosure": "This call is recorded.",
            },
        ).json()
        http.post("/v1/dnc", json={"phone": "+14155550108", "reason": "asked by email"})
        window = {
            "days": [0, 1, 2, 3, 4, 5, 6],
            "start": "00:00",
            "end": "23:59",
            "timezone": "UTC",
        }
        campaign = http.post(
            "/v1/campaigns",
            json={
                "name": "Demo",
                "agent_id": agent["id"],
                "from": "+14155550100",
                "calling_window": window,
                "max_concurrent_calls": 4,
                "calls_per_second": 2,
                "retry_policy": {"no_answer": {"max_attempts": 2, "delay_seconds": 2}},
            },
        ).json()
        files = {"file": ("leads.csv", CSV.encode(), "text/csv")}
        print(http.post(f"/v1/campaigns/{campaign['id']}/contacts", files=files).json())
        http.post(f"/v1/campaigns/{campaign['id']}/start")
        for _ in range(600):
            state = http.get(f"/v1/campaigns/{campaign['id']}").json()
            print(f"\r{state['status']:<10} {state['stats']['contacts']}", end="", flush=True)
            if state["status"] == "completed":
                break
            time.sleep(0.5)
        print()
        print(http.get(f"/v1/campaigns/{campaign['id']}/results?format=csv").text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
