"""Hangup causes: FreeSWITCH's names and their Q.850 numbers."""

from __future__ import annotations

Q850: dict[str, int] = {
    "NONE": 0, "UNALLOCATED_NUMBER": 1, "NO_ROUTE_TRANSIT_NET": 2, "NO_ROUTE_DESTINATION": 3,
    "CHANNEL_UNACCEPTABLE": 6, "CALL_AWARDED_DELIVERED": 7, "NORMAL_CLEARING": 16, "USER_BUSY": 17,
    "NO_USER_RESPONSE": 18, "NO_ANSWER": 19, "SUBSCRIBER_ABSENT": 20, "CALL_REJECTED": 21,
    "NUMBER_CHANGED": 22, "REDIRECTION_TO_NEW_DESTINATION": 23, "EXCHANGE_ROUTING_ERROR": 25,
    "DESTINATION_OUT_OF_ORDER": 27, "INVALID_NUMBER_FORMAT": 28, "FACILITY_REJECTED": 29,
    "RESPONSE_TO_STATUS_ENQUIRY": 30, "NORMAL_UNSPECIFIED": 31, "NORMAL_CIRCUIT_CONGESTION": 34,
    "NETWORK_OUT_OF_ORDER": 38, "NORMAL_TEMPORARY_FAILURE": 41, "SWITCH_CONGESTION": 42,
    "CHAN_NOT_IMPLEMENTED": 66, "INCOMPATIBLE_DESTINATION": 88, "RECOVERY_ON_TIMER_EXPIRE": 102,
    "INTERWORKING": 127, "SUCCESS": 142, "ORIGINATOR_CANCEL": 487, "LOSE_RACE": 502,
    "MANAGER_REQUEST": 503, "BLIND_TRANSFER": 600, "ATTENDED_TRANSFER": 601, "ALLOTTED_TIMEOUT": 602,
    "MEDIA_TIMEOUT": 604, "PICKED_OFF": 605, "USER_NOT_REGISTERED": 606, "PROGRESS_TIMEOUT": 607,
    "INVALID_GATEWAY": 608, "GATEWAY_DOWN": 609, "INVALID_URL": 610, "INVALID_PROFILE": 611,
    "NO_PICKUP": 612, "DECLINE": 616,
}

# Causes after which the bridge app does not hang the caller up (switch_channel_handle_cause).
NO_HANGUP_ON_FAIL = frozenset({"NO_ANSWER", "NO_USER_RESPONSE", "ORIGINATOR_CANCEL"})

# DIALSTATUS values the originate code sets on the caller for a failed bridge.
# (switch_ivr_originate.c; any other cause is reported by its own name).
DIALSTATUS = {
    "ORIGINATOR_CANCEL": "CANCEL",
    "USER_BUSY": "BUSY",
    "NO_ANSWER": "NOANSWER",
    "DESTINATION_OUT_OF_ORDER": "INVALIDARGS",
    "INVALID_PROFILE": "INVALIDARGS",
    "CALL_REJECTED": "DONTCALL",
}

# SIP status and reason phrase the far end sends for refused calls in the number plan.
SIP_REFUSALS = {
    "USER_BUSY": (486, "Busy Here"),
    "UNALLOCATED_NUMBER": (404, "Not Found"),
    "CALL_REJECTED": (403, "Forbidden"),
}


def parse_cause(text: str | None, default: str = "NORMAL_CLEARING") -> str:
    """A cause name from a name or Q.850 number; unknown text gives the default."""
    if not text:
        return default
    text = text.strip().upper()
    if text in Q850:
        return text
    if text.isdigit():
        for name, code in Q850.items():
            if code == int(text):
                return name
    return default


def q850(cause: str) -> int:
    """The Q.850 number FreeSWITCH reports for a cause (its own causes above 127 report 16)."""
    code = Q850.get(cause, 0)
    return code if code <= 127 else Q850["NORMAL_CLEARING"]
