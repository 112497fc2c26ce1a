"""Twinline: patient digital twins from FHIR, HL7 v2, DICOM and device data.

The flow is one-way: connectors -> mapping -> views -> store -> gate -> twins.
Stages exchange the small value types in `pipeline.units`.
"""

__version__ = "0.1.0"

from . import compiled

compiled.install()  # before any other submodule: a stale compiled module must not load
