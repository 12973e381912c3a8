"""edge-agent: the part's tag carries its instructions; the agent programs the station's machine.

Data flow, one package each: tag -> instructions -> station -> machine -> uplink.
"""

__version__ = "0.1.0"
