"""The FreeSWITCH side: the Event Socket client (``esl``, ``protocol``), every command we send
(``commands``), and the engine that holds the connection and routes events to calls (``engine``)."""
