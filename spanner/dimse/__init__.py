"""An asyncio DICOM networking engine: the Upper Layer (PS3.8) and DIMSE C-ECHO / C-FIND / C-MOVE (PS3.7).

- ``pdu``: the PDUs and their items, encoded and decoded (association set-up, P-DATA, release, abort).
- ``messages``: DIMSE command sets (Implicit VR Little Endian) and the fragmenting of messages into PDVs.
- ``association``: one association on asyncio streams: the requestor side (``connect``: C-ECHO, C-FIND,
  C-MOVE as SCU, C-CANCEL, release, abort) and what both sides share (reading messages, timeouts).
- ``acceptor``: a listener handing each accepted association's C-ECHO / C-FIND / C-MOVE requests to async
  handlers (pynetdicom style: a C-FIND handler yields pending identifiers as encoded bytes).
- ``store``: C-STORE, both sides: the acceptor writes incoming data sets to Part-10 files as they arrive;
  the SCU sends Part-10 files one PDU at a time (docs/retrieval-engine.md).
- ``errors``: the engine's exceptions, one hierarchy.

Every socket gets TCP_NODELAY: command and data set are separate writes, and Nagle with delayed ACK would
stall each message about 40 ms.
"""
