"""DICOM constants the spanner speaks: SOP classes, transfer syntaxes, DIMSE command fields and statuses,
and the tags of Query/Retrieve. The one place for each; the engine, the actors and the simulator import them.
"""

from __future__ import annotations

from enum import IntEnum

import pydicom.uid as _uid

# -- SOP classes (PS3.4 Annex A and C) ---------------------------------------------------------------
VERIFICATION = "1.2.840.10008.1.1"
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
FIND_SOP_CLASSES = frozenset({PATIENT_ROOT_FIND, STUDY_ROOT_FIND})
MOVE_SOP_CLASSES = frozenset({PATIENT_ROOT_MOVE, STUDY_ROOT_MOVE})
GET_SOP_CLASSES = frozenset({PATIENT_ROOT_GET, STUDY_ROOT_GET})
# Every Storage SOP Class lives under this root (PS3.4 B.5, PS3.6 A): a storage SCP tests membership by it.
STORAGE_SOP_CLASS_ROOT = "1.2.840.10008.5.1.4.1.1."

# The storage classes a C-GET requester asks an archive for, one presentation context each with the SCP
# role (PS3.7 D.3.3.4): an association holds at most 128 contexts, one of them the C-GET's own, so this is a
# choice of the common ones (pydicom names them). An instance of a class not listed is a failed
# sub-operation at the archive; a retrieval's failover or a C-MOVE node then has to fetch it.
COMMON_STORAGE_CLASSES: tuple[str, ...] = tuple(str(getattr(_uid, name)) for name in (
    "ComputedRadiographyImageStorage", "DigitalXRayImageStorageForPresentation",
    "DigitalXRayImageStorageForProcessing", "DigitalMammographyXRayImageStorageForPresentation",
    "DigitalMammographyXRayImageStorageForProcessing", "DigitalIntraOralXRayImageStorageForPresentation",
    "CTImageStorage", "EnhancedCTImageStorage", "LegacyConvertedEnhancedCTImageStorage",
    "UltrasoundMultiFrameImageStorage", "UltrasoundImageStorage", "EnhancedUSVolumeStorage",
    "MRImageStorage", "EnhancedMRImageStorage", "EnhancedMRColorImageStorage",
    "LegacyConvertedEnhancedMRImageStorage", "MRSpectroscopyStorage",
    "SecondaryCaptureImageStorage", "MultiFrameSingleBitSecondaryCaptureImageStorage",
    "MultiFrameGrayscaleByteSecondaryCaptureImageStorage",
    "MultiFrameGrayscaleWordSecondaryCaptureImageStorage", "MultiFrameTrueColorSecondaryCaptureImageStorage",
    "XRayAngiographicImageStorage", "EnhancedXAImageStorage", "XRayRadiofluoroscopicImageStorage",
    "EnhancedXRFImageStorage", "XRay3DAngiographicImageStorage", "XRay3DCraniofacialImageStorage",
    "BreastTomosynthesisImageStorage", "NuclearMedicineImageStorage",
    "PositronEmissionTomographyImageStorage",
    "EnhancedPETImageStorage", "LegacyConvertedEnhancedPETImageStorage", "ParametricMapStorage",
    "RTImageStorage", "RTDoseStorage", "RTStructureSetStorage", "RTPlanStorage", "RTIonPlanStorage",
    "RTBeamsTreatmentRecordStorage", "RTBrachyTreatmentRecordStorage", "RTTreatmentSummaryRecordStorage",
    "SegmentationStorage", "SurfaceSegmentationStorage", "SpatialRegistrationStorage",
    "DeformableSpatialRegistrationStorage", "SpatialFiducialsStorage", "RealWorldValueMappingStorage",
    "GrayscaleSoftcopyPresentationStateStorage", "ColorSoftcopyPresentationStateStorage",
    "PseudoColorSoftcopyPresentationStateStorage", "BlendingSoftcopyPresentationStateStorage",
    "KeyObjectSelectionDocumentStorage", "BasicTextSRStorage", "EnhancedSRStorage", "ComprehensiveSRStorage",
    "Comprehensive3DSRStorage", "ExtensibleSRStorage", "MammographyCADSRStorage", "ChestCADSRStorage",
    "XRayRadiationDoseSRStorage", "PatientRadiationDoseSRStorage", "EncapsulatedPDFStorage",
    "EncapsulatedCDAStorage", "EncapsulatedSTLStorage", "VLEndoscopicImageStorage",
    "VideoEndoscopicImageStorage", "VLMicroscopicImageStorage", "VLSlideCoordinatesMicroscopicImageStorage",
    "VLPhotographicImageStorage", "VideoPhotographicImageStorage", "VLWholeSlideMicroscopyImageStorage",
    "OphthalmicPhotography8BitImageStorage", "OphthalmicPhotography16BitImageStorage",
    "OphthalmicTomographyImageStorage", "TwelveLeadECGWaveformStorage", "GeneralECGWaveformStorage",
    "AmbulatoryECGWaveformStorage", "HemodynamicWaveformStorage", "BasicVoiceAudioWaveformStorage",
    "RawDataStorage",
))

# -- transfer syntaxes and the application context (PS3.5 A, PS3.7 A.2) -------------------------------
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
# dicom-spanner's implementation class UID (root 1.2.826.0.1.3680043.10.1437) and version name
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1437.1"
IMPLEMENTATION_VERSION = "SPANNER_DIMSE"


class CommandField(IntEnum):
    """(0000,0100) CommandField, PS3.7 E.1."""

    C_STORE_RQ = 0x0001
    C_STORE_RSP = 0x8001
    C_FIND_RQ = 0x0020
    C_FIND_RSP = 0x8020
    C_MOVE_RQ = 0x0021
    C_MOVE_RSP = 0x8021
    C_GET_RQ = 0x0010
    C_GET_RSP = 0x8010
    C_ECHO_RQ = 0x0030
    C_ECHO_RSP = 0x8030
    C_CANCEL_RQ = 0x0FFF


class Status(IntEnum):
    """DIMSE statuses used here (PS3.7 C, PS3.4 C.4)."""

    SUCCESS = 0x0000
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    OUT_OF_RESOURCES = 0xA700
    # C-MOVE/C-GET: Refused, out of resources, unable to perform sub-operations (PS3.4 C.4.2.1.5, C.4.3.1.4)
    SUBOPERATIONS_OUT_OF_RESOURCES = 0xA702
    MOVE_DESTINATION_UNKNOWN = 0xA801
    IDENTIFIER_DOES_NOT_MATCH = 0xA900
    SUBOPERATIONS_FAILED = 0xB000
    UNABLE_TO_PROCESS = 0xC000
    LOOP_DETECTED = 0xC005  # C-FIND/C-MOVE "unable to process": the query already passed this dicom-spanner
    CANCEL = 0xFE00
    PENDING = 0xFF00
    PENDING_WARNING = 0xFF01


PENDING_STATUSES = frozenset({Status.PENDING, Status.PENDING_WARNING})
NO_DATASET = 0x0101  # (0000,0800) CommandDataSetType: no data set follows
DATASET_PRESENT = 0x0001
PRIORITY_MEDIUM = 0x0000

# -- command set elements (group 0000) ------------------------------------------------------------------
AFFECTED_SOP_CLASS_UID = 0x0002
COMMAND_FIELD = 0x0100
MESSAGE_ID = 0x0110
MESSAGE_ID_BEING_RESPONDED_TO = 0x0120
AFFECTED_SOP_INSTANCE_UID = 0x1000
MOVE_DESTINATION = 0x0600
MOVE_ORIGINATOR_AE_TITLE = 0x1030
MOVE_ORIGINATOR_MESSAGE_ID = 0x1031
PRIORITY = 0x0700
COMMAND_DATA_SET_TYPE = 0x0800
STATUS = 0x0900
ERROR_COMMENT = 0x0902
REMAINING_SUBOPERATIONS = 0x1020
COMPLETED_SUBOPERATIONS = 0x1021
FAILED_SUBOPERATIONS = 0x1022
WARNING_SUBOPERATIONS = 0x1023

# -- data set tags of Query/Retrieve (PS3.4 C.4) ----------------------------------------------------------
SPECIFIC_CHARACTER_SET = 0x00080005
QUERY_RETRIEVE_LEVEL = 0x00080052
RETRIEVE_AE_TITLE = 0x00080054
PATIENT_ID = 0x00100020
ISSUER_OF_PATIENT_ID = 0x00100021
STUDY_INSTANCE_UID = 0x0020000D
SERIES_INSTANCE_UID = 0x0020000E
SOP_INSTANCE_UID = 0x00080018
FAILED_SOP_INSTANCE_UID_LIST = 0x00080058

# -- WADO-RS (PS3.18 10.4, 8.7.3) -------------------------------------------------------------------------
PIXEL_DATA = 0x7FE00010
MEDIA_DICOM = "application/dicom"
MEDIA_DICOM_JSON = "application/dicom+json"
MEDIA_OCTET_STREAM = "application/octet-stream"
MEDIA_MULTIPART = "multipart/related"
