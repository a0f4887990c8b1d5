"""The campaign domain's pure parts: calling windows in each contact's local time (across
daylight-saving changes), timezones from numbers, outcomes of finished calls and the retry
policy, voicemail greetings told apart by their words."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import phonenumbers

from campaigns.policy import next_step, outcome_of, outcome_of_error
from campaigns.window import CallingWindow, timezone_for_number
from models import Call
from pipeline.voicemail import is_voicemail_greeting

WINDOW = CallingWindow.from_dict(None)  # 9:00-20:00 Monday to Friday


def test_default_window_in_the_contacts_own_zone():
    wednesday_1630_utc = datetime(2027, 1, 6, 16, 30, tzinfo=UTC)
    assert WINDOW.is_open(wednesday_1630_utc, "America/New_York")  # 11:30
    assert not WINDOW.is_open(wednesday_1630_utc, "America/Los_Angeles")  # 8:30
    assert WINDOW.next_open(wednesday_1630_utc, "America/Los_Angeles") == datetime(
        2027, 1, 6, 17, 0, tzinfo=UTC
    )
    friday_night = datetime(2027, 1, 9, 2, 0, tzinfo=UTC)  # Friday 21:00 in New York
    assert WINDOW.next_open(friday_night, "America/New_York") == datetime(
        2027, 1, 11, 14, 0, tzinfo=UTC
    )  # Monday 9:00


def test_window_opens_at_local_nine_across_a_daylight_saving_change():
    # US clocks spring forward on Sunday 2027-03-14: 9:00 New York is 14:00 UTC before
    # and 13:00 UTC after
    saturday = datetime(2027, 3, 13, 12, 0, tzinfo=UTC)
    assert WINDOW.next_open(saturday, "America/New_York") == datetime(
        2027, 3, 15, 13, 0, tzinfo=UTC
    )


def test_an_unknown_zone_falls_back_to_the_windows_and_no_days_never_opens():
    at = datetime(2027, 1, 6, 15, 0, tzinfo=UTC)  # 10:00 in New York, the fallback
    assert WINDOW.is_open(at, "Not/AZone")
    never = CallingWindow.from_dict({"days": []})
    assert never.next_open(at, "UTC") is None


def test_timezone_from_the_number():
    def zone(number: str) -> str:
        return timezone_for_number(phonenumbers.parse(number), "America/New_York")

    assert zone("+14155550100") == "America/Los_Angeles"
    assert zone("+12125550100") == "America/New_York"
    assert zone("+442079460000") == "Europe/London"
    assert zone("+4915112345678") == "Europe/Berlin"


def _call(**fields: object) -> Call:
    base: dict[str, object] = {"status": "completed", "direction": "outbound"}
    return Call(**{**base, **fields})


def test_outcomes_of_finished_calls():
    now = datetime(2027, 1, 6, tzinfo=UTC)
    assert outcome_of(_call(started_at=now)) == "answered"
    assert outcome_of(_call(started_at=now, ended_reason="opted-out")) == "opted_out"
    assert outcome_of(_call(started_at=now, ended_reason="voicemail")) == "voicemail"
    assert outcome_of(_call(started_at=now, answered_by="machine_end_silence")) == "voicemail"
    assert outcome_of(_call(status="busy")) == "busy"
    assert outcome_of(_call(status="no-answer")) == "no_answer"
    assert outcome_of(_call(status="canceled")) == "no_answer"
    assert outcome_of(_call(status="failed", error_message="Twilio error 21211: bad")) == "invalid"
    assert outcome_of(_call(status="failed", error_message="Twilio error 20500: x")) == "failed"
    assert outcome_of_error(21217) == "invalid" and outcome_of_error(None) == "failed"


def test_retry_policy_per_outcome():
    now = datetime(2027, 1, 6, tzinfo=UTC)
    policy = {"no_answer": {"max_attempts": 2, "delay_seconds": 60}}
    first = next_step("no_answer", 1, policy, now)
    assert first.state == "pending" and first.at == now + timedelta(seconds=60)
    assert next_step("no_answer", 2, policy, now).state == "no_answer"
    assert next_step("busy", 1, policy, now).state == "pending"  # the default policy: 3
    assert next_step("answered", 1, policy, now).state == "answered"
    assert next_step("invalid", 1, policy, now).state == "invalid"


def test_voicemail_greetings_by_their_words():
    for line in (
        "Hi, you've reached Sam. Please leave a message after the tone.",
        "The person you are calling is not available.",
        "I can't take your call right now",
        "Welcome to the voicemail box of 415 555 0100",
    ):
        assert is_voicemail_greeting(line), line
    for line in ("Hello?", "Yes, this is Sam speaking.", "Who is this?"):
        assert not is_voicemail_greeting(line), line
