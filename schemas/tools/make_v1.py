# Generator of schemas/twin-v1.json (run from the repo root). v1 is released (2026-11-28): the JSON
# is frozen and this script refuses to overwrite it; it stays as the starting point of twin-v2.
import json
P = "provenance"
def c(name, type_, desc, required=False, **kw):
    d = {"name": name, "type": type_, "required": required, "description": desc}
    d.update(kw)
    return d
def when(name, desc, required=False):
    """A FHIR date/dateTime/instant: UTC instant + precision + original offset."""
    return [
        c(name, "timestamp", desc + " (UTC; the start of the period the source's precision allows)", required),
        c(name + "_precision", "string", f"precision of {name} in the source: year, month, day, minute, second or millisecond", False,
          values=["year", "month", "day", "minute", "second", "millisecond"]),
        c(name + "_offset", "string", f"UTC offset of {name} as written in the source (+HH:MM), null when it had none"),
    ]
def coding(prefix, desc, systems=None):
    code_name = "code" if prefix == "code" else f"{prefix}_code"
    cols = [c(f"{prefix}_system", "string", f"code system URI of {desc}"),
            c(code_name, "string", f"code of {desc}", **({"code_systems": systems} if systems else {})),
            c(f"{prefix}_display", "string", f"display text of {desc}")]
    return cols
SNOMED="http://snomed.info/sct"; LOINC="http://loinc.org"; RXNORM="http://www.nlm.nih.gov/research/umls/rxnorm"; CVX="http://hl7.org/fhir/sid/cvx"; ICD10="http://hl7.org/fhir/sid/icd-10-cm"
tables = {}
tables["patient"] = dict(
    description="One row per patient record of a source (a FHIR Patient, an HL7 PID, a DICOM patient, a device-log subject). Records of the same person share a twin_id.",
    unit="resource", key=["patient_id"], patient_column="patient_id",
    columns=[
        c("patient_id", "string", "the patient's id in the source (FHIR Patient.id)", True),
        c("active", "boolean", "Patient.active"),
        c("name_family", "string", "family name of the official (else first) name; dropped under --deid"),
        c("name_given", "string", "given names, space separated; dropped under --deid"),
        *when("birth_date", "birth date"),
        c("sex", "string", "administrative gender", values=["male", "female", "other", "unknown"], code_systems=["http://hl7.org/fhir/administrative-gender"]),
        c("race_code", "string", "US Core race OMB category code (or HL7 PID-10)", code_systems=["urn:oid:2.16.840.1.113883.6.238", "http://terminology.hl7.org/CodeSystem/v3-Race"]),
        c("race_display", "string", "race as displayed in the source"),
        c("ethnicity_code", "string", "US Core ethnicity OMB category code (or HL7 PID-22)", code_systems=["urn:oid:2.16.840.1.113883.6.238", "http://terminology.hl7.org/CodeSystem/v2-0189"]),
        c("ethnicity_display", "string", "ethnicity as displayed in the source"),
        c("deceased", "boolean", "true when the source says the patient died"),
        *when("deceased_at", "time of death"),
        c("postal_code", "string", "postal code of the home (else first) address; cut to 3 digits under --deid"),
        c("state", "string", "state or province of that address"),
        c("country", "string", "country of that address"),
        c("managing_organization_id", "string", "Organization id of Patient.managingOrganization"),
    ])
tables["patient_identifier"] = dict(
    description="Identifiers of patient records, one row each: the input of identity linking.",
    unit="resource", key=["patient_id", "system", "value"], patient_column="patient_id",
    columns=[
        c("patient_id", "string", "the patient's id in the source", True),
        c("system", "string", "identifier namespace (FHIR Identifier.system, HL7 CX.4 assigning authority, DICOM IssuerOfPatientID)"),
        c("value", "string", "the identifier", True),
        c("type_code", "string", "identifier type (v2-0203: MR, SS, DL, PPN, ...)", code_systems=["http://terminology.hl7.org/CodeSystem/v2-0203"]),
        c("use", "string", "usual, official, temp, secondary, old"),
        c("assigner", "string", "display of the assigning organization"),
    ])
tables["patient_link"] = dict(
    description="Patient.link and HL7 merges (ADT^A40): records that stand for the same person.",
    unit="resource", key=["patient_id", "other_patient_id"], patient_column="patient_id",
    columns=[
        c("patient_id", "string", "the record that carries the link", True),
        c("other_patient_id", "string", "the record it points to", True),
        c("link_type", "string", "replaced-by, replaces, refer, seealso", True, values=["replaced-by", "replaces", "refer", "seealso"]),
    ])
tables["encounter"] = dict(
    description="Visits and stays.", unit="resource", key=["encounter_id"], patient_column="patient_id",
    columns=[
        c("encounter_id", "string", "Encounter.id", True),
        c("patient_id", "string", "the patient", True),
        c("status", "string", "Encounter.status", True),
        c("class_system", "string", "system of Encounter.class"),
        c("class_code", "string", "Encounter.class (AMB, IMP, EMER, ...)", code_systems=["http://terminology.hl7.org/CodeSystem/v3-ActCode"]),
        *coding("type", "the first Encounter.type coding", [SNOMED]),
        *when("period_start", "start of the encounter"),
        *when("period_end", "end of the encounter"),
        c("location_id", "string", "Location id of the first location"),
        c("location_display", "string", "display of the first location (ward, bed)"),
        c("service_provider_id", "string", "Organization id of the service provider"),
        c("practitioner_id", "string", "Practitioner id of the first participant"),
        c("admit_source_code", "string", "hospitalization.admitSource code"),
        c("discharge_disposition_code", "string", "hospitalization.dischargeDisposition code"),
        *coding("reason", "the first reasonCode coding"),
    ])
tables["observation"] = dict(
    description="Measurements and findings: vital signs, labs, survey answers, device samples. A panel's components (systolic and diastolic pressure) are rows of their own, after the panel's row.",
    unit="resource", key=["observation_id", "row_index"], patient_column="patient_id",
    columns=[
        c("observation_id", "string", "Observation.id (device samples: a stable id derived from device, signal and time)", True),
        c("patient_id", "string", "the patient"),
        c("encounter_id", "string", "the encounter"),
        c("is_component", "boolean", "true for a component row (its panel code is in panel_code)", True),
        c("panel_code", "string", "code of the Observation the row comes from: for a component row its panel (85354-9 blood pressure), for the main row its own code"),
        c("category_code", "string", "first category code", code_systems=["http://terminology.hl7.org/CodeSystem/observation-category"],
          values=["vital-signs", "laboratory", "survey", "social-history", "imaging", "procedure", "exam", "therapy", "activity", "device"]),
        *coding("code", "what was observed (device signals without a LOINC code: https://twinline.dev/codes/device, mappings/devices/README.md)",
                [LOINC, SNOMED, "https://twinline.dev/codes/device"]),
        c("value_type", "string", "which value[x] was present", values=["Quantity", "CodeableConcept", "string", "boolean", "integer", "dateTime", "time", "Period", "Ratio", "Range", "SampledData"]),
        c("value_number", "float64", "numeric value (Quantity, integer, or the mean of a downsampled window)"),
        c("value_comparator", "string", "<, <=, >=, > when the value is a limit"),
        c("value_unit", "string", "UCUM unit code of value_number", code_systems=["http://unitsofmeasure.org"]),
        c("value_unit_display", "string", "unit as written in the source"),
        c("value_code_system", "string", "system of a coded value"),
        c("value_code", "string", "coded value"),
        c("value_display", "string", "display of a coded value"),
        c("value_string", "string", "text value (string, dateTime, time values as written)"),
        c("value_boolean", "boolean", "boolean value"),
        c("value_min", "float64", "downsampled window: minimum"),
        c("value_max", "float64", "downsampled window: maximum"),
        c("sample_count", "int64", "downsampled window: number of samples (null for a single measurement)"),
        *when("effective_start", "when it was observed (start of the window for a downsampled row)"),
        *when("effective_end", "end of the observation period"),
        c("status", "string", "Observation.status", True, values=["registered", "preliminary", "final", "amended", "corrected", "cancelled", "entered-in-error", "unknown"]),
        c("interpretation_code", "string", "abnormal flag (H, L, A, N, ...)", code_systems=["http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"]),
        c("reference_low", "float64", "low end of the reference range"),
        c("reference_high", "float64", "high end of the reference range"),
        c("reference_text", "string", "reference range as text"),
        c("device_id", "string", "Device id of the measuring device"),
        c("quality_flag", "string", "set when a value is kept but implausible (for example outside the mapping's plausible range)"),
    ])
tables["condition"] = dict(
    description="Problems and diagnoses.", unit="resource", key=["condition_id"], patient_column="patient_id",
    columns=[
        c("condition_id", "string", "Condition.id", True),
        c("patient_id", "string", "the patient", True),
        c("encounter_id", "string", "the encounter"),
        c("clinical_status", "string", "active, recurrence, relapse, inactive, remission, resolved"),
        c("verification_status", "string", "unconfirmed, provisional, differential, confirmed, refuted, entered-in-error"),
        c("category_code", "string", "problem-list-item, encounter-diagnosis, ..."),
        *coding("code", "the condition", [SNOMED, ICD10]),
        *when("onset", "onset"),
        *when("abatement", "abatement"),
        *when("recorded", "recordedDate"),
    ])
tables["medication"] = dict(
    description="MedicationRequest, MedicationAdministration and MedicationStatement, one row each; `kind` says which.",
    unit="resource", key=["kind", "medication_record_id"], patient_column="patient_id",
    columns=[
        c("kind", "string", "request, administration or statement", True, values=["request", "administration", "statement"]),
        c("medication_record_id", "string", "the resource's id", True),
        c("patient_id", "string", "the patient", True),
        c("encounter_id", "string", "the encounter (context)"),
        c("status", "string", "the resource's status", True),
        c("intent", "string", "MedicationRequest.intent"),
        *coding("code", "the medication", [RXNORM, SNOMED]),
        c("medication_ref_id", "string", "Medication id when the medication is a reference"),
        *when("effective_start", "authoredOn (request), effective[x] start (administration, statement)"),
        *when("effective_end", "effective[x] end"),
        c("dose_value", "float64", "dose quantity"),
        c("dose_unit", "string", "UCUM unit of the dose"),
        c("route_code", "string", "route"),
        c("practitioner_id", "string", "requester or performer"),
        c("reason_code", "string", "first reason code"),
    ])
tables["procedure"] = dict(
    description="Procedures performed.", unit="resource", key=["procedure_id"], patient_column="patient_id",
    columns=[
        c("procedure_id", "string", "Procedure.id", True),
        c("patient_id", "string", "the patient", True),
        c("encounter_id", "string", "the encounter"),
        c("status", "string", "Procedure.status", True),
        *coding("code", "the procedure", [SNOMED]),
        *when("performed_start", "performed[x] start"),
        *when("performed_end", "performed[x] end"),
        c("body_site_code", "string", "first body site code"),
        c("reason_code", "string", "first reason code"),
        c("location_id", "string", "Location id"),
    ])
tables["immunization"] = dict(
    description="Vaccinations (FHIR Immunization, HL7 VXU).", unit="resource", key=["immunization_id"], patient_column="patient_id",
    columns=[
        c("immunization_id", "string", "Immunization.id", True),
        c("patient_id", "string", "the patient", True),
        c("encounter_id", "string", "the encounter"),
        c("status", "string", "completed, entered-in-error, not-done", True),
        *coding("vaccine", "the vaccine", [CVX]),
        *when("occurrence", "when it was given"),
        c("primary_source", "boolean", "recorded by the one who gave it"),
        c("lot_number", "string", "lot number"),
        c("site_code", "string", "body site"),
        c("route_code", "string", "route"),
        c("dose_number", "string", "dose number in the series"),
        c("practitioner_id", "string", "performer"),
    ])
tables["allergy"] = dict(
    description="Allergies and intolerances.", unit="resource", key=["allergy_id"], patient_column="patient_id",
    columns=[
        c("allergy_id", "string", "AllergyIntolerance.id", True),
        c("patient_id", "string", "the patient", True),
        c("clinical_status", "string", "active, inactive, resolved"),
        c("verification_status", "string", "unconfirmed, confirmed, refuted, entered-in-error"),
        c("type", "string", "allergy or intolerance"),
        c("category", "string", "food, medication, environment, biologic (first)"),
        c("criticality", "string", "low, high, unable-to-assess"),
        *coding("code", "the substance or condition", [SNOMED, RXNORM]),
        *when("onset", "onset"),
        *when("recorded", "recordedDate"),
        c("reaction_code", "string", "first manifestation code of the first reaction"),
        c("reaction_severity", "string", "mild, moderate, severe"),
    ])
tables["diagnostic_report"] = dict(
    description="Reports that group results (FHIR DiagnosticReport, HL7 OBR).", unit="resource", key=["report_id"], patient_column="patient_id",
    columns=[
        c("report_id", "string", "DiagnosticReport.id", True),
        c("patient_id", "string", "the patient"),
        c("encounter_id", "string", "the encounter"),
        c("status", "string", "DiagnosticReport.status", True),
        c("category_code", "string", "first category code"),
        *coding("code", "the report", [LOINC]),
        *when("effective_start", "clinically relevant time"),
        *when("issued", "when it was released"),
        c("result_count", "int64", "number of results it lists"),
    ])
tables["imaging_study"] = dict(
    description="Imaging studies (DICOM, FHIR ImagingStudy).", unit="resource", key=["study_id"], patient_column="patient_id",
    columns=[
        c("study_id", "string", "ImagingStudy.id", True),
        c("study_instance_uid", "string", "DICOM Study Instance UID"),
        c("patient_id", "string", "the patient"),
        c("encounter_id", "string", "the encounter"),
        c("status", "string", "ImagingStudy.status", True),
        *when("started", "when the study started"),
        c("modalities", "string", "modalities of the study, space separated (DICOM CID 29 codes)"),
        c("number_of_series", "int64", "number of series"),
        c("number_of_instances", "int64", "number of instances"),
        c("description", "string", "study description"),
        c("accession_number", "string", "accession number"),
        c("referrer_id", "string", "Practitioner id of the referring physician"),
        c("referrer_display", "string", "referring physician as written; dropped under --deid"),
        *coding("procedure", "the first procedure code"),
        c("location_id", "string", "Location id"),
    ])
tables["imaging_series"] = dict(
    description="Series of imaging studies, one row each.", unit="resource", key=["study_id", "series_instance_uid"], patient_column="patient_id",
    columns=[
        c("study_id", "string", "ImagingStudy.id", True),
        c("patient_id", "string", "the patient"),
        c("series_instance_uid", "string", "DICOM Series Instance UID", True),
        c("series_number", "int64", "series number"),
        c("modality", "string", "modality (DICOM CID 29)", code_systems=["http://dicom.nema.org/resources/ontology/DCM"]),
        c("description", "string", "series description"),
        c("body_site_code", "string", "body part (SNOMED or DICOM body part examined)"),
        c("body_site_display", "string", "body part as written"),
        c("laterality", "string", "laterality code"),
        c("number_of_instances", "int64", "number of instances"),
        *when("started", "when the series started"),
        c("device_id", "string", "Device id of the equipment (see the device table)"),
    ])
tables["device"] = dict(
    description="Devices seen in the data: scanners, monitors, wearables, implants.", unit="resource", key=["device_id"], patient_column="patient_id",
    columns=[
        c("device_id", "string", "Device.id (for equipment and wearables: a stable id derived from what identifies it)", True),
        c("patient_id", "string", "the patient it is attached to, when it is"),
        c("kind", "string", "what sort of device: imaging-equipment, monitor, wearable, implant, other", values=["imaging-equipment", "monitor", "wearable", "implant", "other"]),
        *coding("type", "the device type"),
        c("manufacturer", "string", "manufacturer"),
        c("model", "string", "model name"),
        c("serial_number", "string", "serial number"),
        c("station_name", "string", "station or device name"),
        c("software_version", "string", "software versions"),
        c("udi", "string", "UDI carrier (device identifier)"),
        c("status", "string", "active, inactive, entered-in-error, unknown"),
    ])
# Assembled tables
struct_coded = "list<struct<system:string,code:string,display:string,since:timestamp>>"
tables["twin"] = dict(
    description="One row per person: the current state assembled from every source.",
    unit="twin", key=["twin_id"], patient_column=None,
    columns=[
        c("as_of", "timestamp", "the state is as known at this time", True),
        c("patient_ids", "list<string>", "source patient records linked into this twin", True),
        c("sources", "list<string>", "sources that contributed", True),
        *when("birth_date", "birth date"),
        c("sex", "string", "administrative gender"),
        c("race_code", "string", "race OMB category code"),
        c("ethnicity_code", "string", "ethnicity OMB category code"),
        c("deceased", "boolean", "died"),
        c("postal_code", "string", "postal code"),
        c("age_years", "int64", "age at as_of (at death when deceased); 90 stands for 90 or more under --deid"),
        c("counts", "map<string,int64>", "rows per table for this twin", True),
        c("active_conditions", struct_coded, "conditions whose clinical status is active, recurrence or relapse"),
        c("active_medications", struct_coded, "medication requests and statements that are active"),
        c("allergies", struct_coded, "active allergies and intolerances"),
        c("latest_vitals", "list<struct<name:string,code:string,value:float64,unit:string,at:timestamp>>", "latest value and time of each vital sign (by LOINC)"),
        c("latest_labs", "list<struct<name:string,code:string,value:float64,unit:string,at:timestamp>>", "latest value and time of each key lab (by LOINC)"),
        c("last_encounter_id", "string", "the most recent encounter"),
        c("last_encounter_class", "string", "its class"),
        c("last_encounter_start", "timestamp", "its start"),
        c("last_encounter_end", "timestamp", "its end"),
        c("imaging_study_count", "int64", "number of imaging studies"),
        c("imaging_modalities", "list<string>", "modalities seen"),
        c("last_imaging_at", "timestamp", "time of the most recent study"),
        c("device_ids", "list<string>", "devices that streamed data for this person"),
        c("device_sample_count", "int64", "device observation rows"),
        c("last_device_sample_at", "timestamp", "time of the most recent device sample"),
        c("news2_score", "int64", "NEWS2 early warning score, when all its inputs were measured within the window before as_of"),
        c("news2_inputs", "list<struct<name:string,value:float64,at:timestamp>>", "the inputs of news2_score with their times"),
        c("quality_flags", "list<string>", "data-quality flags on this twin (see the gate report)"),
        c("inputs_hash", "string", "hash of every input row: a twin is rebuilt only when this changes", True),
    ])
tables["timeline"] = dict(
    description="Every event of a twin in time order.", unit="twin", key=["twin_id", "event_table", "event_key", "row_index"], patient_column=None,
    columns=[
        c("at", "timestamp", "when it happened (start)"),
        c("at_precision", "string", "precision of at"),
        c("end_at", "timestamp", "when it ended"),
        c("event_table", "string", "the table the event comes from", True),
        c("event_key", "string", "the unit key of the event's row there", True),
        c("kind", "string", "a short label: encounter, vital, lab, condition, medication, procedure, immunization, allergy, imaging, device", True),
        c("code_system", "string", "code system"),
        c("code", "string", "code"),
        c("display", "string", "display"),
        c("value", "string", "the value as text, with its unit"),
        c("status", "string", "status"),
    ])
# Bookkeeping tables
tables["quarantine"] = dict(
    description="Units that could not be used: what, where from, which stage, why. Never dropped.",
    unit="none", key=["quarantine_id"], provenance=False,
    columns=[
        c("quarantine_id", "string", "stable id of the entry (hash of source, locator, stage and reason)", True),
        c("run_id", "string", "the run that quarantined it", True),
        c("quarantined_at", "timestamp", "when", True),
        c("source", "string", "configured source name", True),
        c("source_kind", "string", "fhir, hl7v2, dicom, csv, gate", True),
        c("source_ref", "string", "locator: file and line, bundle entry, message control id, SOP Instance UID, table row", True),
        c("stage", "string", "read, parse, map, view, schema, store, gate", True),
        c("reason", "string", "reason code, stable (see docs/quarantine.md)", True),
        c("message", "string", "what is wrong, without patient data", True),
        c("target_table", "string", "the table the unit was meant for, when known"),
        c("payload", "binary", "the unit as read (bytes), when not larger than the payload limit"),
        c("payload_ref", "string", "where to find the unit again when the payload is not kept (path and byte range)"),
        c("status", "string", "open, retried or resolved", True, values=["open", "resolved"]),
        c("resolved_run_id", "string", "the run that stored it after a retry"),
    ])
tables["runs"] = dict(
    description="One row per run: what it read, what it wrote, what it quarantined, the checks, the outcome.",
    unit="none", key=["run_id"], provenance=False,
    columns=[
        c("run_id", "string", "run id (sortable by start time)", True),
        c("command", "string", "the command (import, fetch, listen, check, build, run, retry)", True),
        c("started_at", "timestamp", "start", True),
        c("ended_at", "timestamp", "end", True),
        c("status", "string", "ok, quarantined, gate_failed, failed, nothing_new", True),
        c("exit_code", "int32", "the process exit code", True),
        c("inputs", "list<string>", "inputs (paths, URLs without credentials)"),
        c("units_read", "int64", "units read", True),
        c("units_written", "int64", "units stored (new, changed or already present)", True),
        c("units_quarantined", "int64", "units quarantined", True),
        c("units_ignored", "int64", "units of resource types no view maps (listed in counts)", True),
        c("counts", "string", "JSON: per source and per table, read / written / unchanged / quarantined / ignored", True),
        c("checks_passed", "int64", "gate checks passed"),
        c("checks_failed", "int64", "gate checks failed"),
        c("forced", "boolean", "a build forced past a failed gate", True),
        c("watermarks", "string", "JSON: per source, the watermark this run advanced to"),
        c("message", "string", "summary or error message, without patient data"),
        c("twinline_version", "string", "software version", True),
        c("schema_version", "string", "twin schema version", True),
    ])
tables["ledger"] = dict(
    description="Files already processed (path, size, hash): what makes file imports incremental.",
    unit="none", key=["source", "path"], provenance=False,
    columns=[
        c("source", "string", "source name", True),
        c("path", "string", "absolute path", True),
        c("size", "int64", "bytes", True),
        c("mtime_ns", "int64", "modification time", True),
        c("sha256", "string", "sha256 of the file (for DICOM, of its first MiB, where the metadata is: pixel data is never read)", True),
        c("run_id", "string", "the run that processed it", True),
        c("processed_at", "timestamp", "when", True),
        c("units_read", "int64", "units read from it", True),
    ])
tables["identity"] = dict(
    description="Which twin each source patient record belongs to, and why (the result of identity linking).",
    unit="none", key=["source", "patient_id"], provenance=False,
    columns=[
        c("source", "string", "source name", True),
        c("patient_id", "string", "the patient's id in that source", True),
        c("twin_id", "string", "the twin it belongs to (keyed hash of the smallest record key of its group)", True),
        c("linked_by", "list<string>", "rules that joined it to the other records of its twin: identifier, patient-link, demographic", True),
        c("group_size", "int64", "records in its twin", True),
        c("run_id", "string", "the run that computed it", True),
    ])
tables["resource_identifier"] = dict(
    description="Identifiers of directory resources (Patient, Practitioner, Organization, Location, Device, ...): resolves conditional references such as Practitioner?identifier=system|value across files and runs.",
    unit="resource", key=["resource_type", "system", "value"], patient_column=None,
    columns=[
        c("resource_type", "string", "FHIR resource type", True),
        c("system", "string", "Identifier.system (empty string when absent)", True),
        c("value", "string", "Identifier.value", True),
        c("resource_id", "string", "the resource's id", True),
    ])
prov = [
    c("twin_id", "string", "the person this row belongs to (keyed hash; null when the unit names no patient)"),
    c("source", "string", "configured source name", True),
    c("source_ref", "string", "where the unit came from: file and line, bundle and entry, message control id and segment, SOP Instance UID; under a privacy profile a keyed locator (ref:<hash>[:line][#entry], docs/privacy.md)", True),
    c("run_id", "string", "the run that wrote the row", True),
    c("ingested_at", "timestamp", "when the row was written", True),
    c("unit_key", "string", "key of the source unit (for example Observation/123); the rows of one unit are replaced together", True),
    c("unit_version", "string", "version of the unit (meta.lastUpdated, meta.versionId): an older version never replaces a newer one"),
    c("row_index", "int32", "position of the row within its unit", True),
    c("content_hash", "string", "hash of the unit's content: an unchanged unit is not written again", True),
]
doc = {
    "schema": "twinline-twin",
    "version": "1",
    "status": "released",
    "released": "2026-11-28",
    "description": "The unified twin schema. A released version is never edited: changes make a new file (twin-v2.json) that lists what changed.",
    "types": "string, boolean, int32, int64, float64, date, timestamp (microseconds, UTC), binary, list<T>, map<string,T>, struct<name:T,...>",
    "provenance": {"description": "Columns every clinical and assembled table carries, after its own columns.", "columns": prov},
    "tables": tables,
}
if json.load(open("schemas/twin-v1.json")).get("status") == "released":
    raise SystemExit("schemas/twin-v1.json is released: it is never edited. Copy this script to make_v2.py")
json.dump(doc, open("schemas/twin-v1.json", "w"), indent=1, ensure_ascii=False)
print(sum(len(t["columns"]) for t in tables.values()), "columns in", len(tables), "tables")
