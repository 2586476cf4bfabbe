from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ContractVersion(_message.Message):
    __slots__ = ("major", "minor")
    MAJOR_FIELD_NUMBER: _ClassVar[int]
    MINOR_FIELD_NUMBER: _ClassVar[int]
    major: int
    minor: int
    def __init__(self, major: _Optional[int] = ..., minor: _Optional[int] = ...) -> None: ...

class Presentation(_message.Message):
    __slots__ = ("course", "presentation", "length_days")
    COURSE_FIELD_NUMBER: _ClassVar[int]
    PRESENTATION_FIELD_NUMBER: _ClassVar[int]
    LENGTH_DAYS_FIELD_NUMBER: _ClassVar[int]
    course: str
    presentation: str
    length_days: int
    def __init__(self, course: _Optional[str] = ..., presentation: _Optional[str] = ..., length_days: _Optional[int] = ...) -> None: ...

class Assessment(_message.Message):
    __slots__ = ("assessment_id", "course", "presentation", "assessment_type", "due_day", "weight")
    ASSESSMENT_ID_FIELD_NUMBER: _ClassVar[int]
    COURSE_FIELD_NUMBER: _ClassVar[int]
    PRESENTATION_FIELD_NUMBER: _ClassVar[int]
    ASSESSMENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    DUE_DAY_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    assessment_id: int
    course: str
    presentation: str
    assessment_type: str
    due_day: int
    weight: float
    def __init__(self, assessment_id: _Optional[int] = ..., course: _Optional[str] = ..., presentation: _Optional[str] = ..., assessment_type: _Optional[str] = ..., due_day: _Optional[int] = ..., weight: _Optional[float] = ...) -> None: ...

class Learner(_message.Message):
    __slots__ = ("course", "presentation", "student_id", "gender", "region", "highest_education", "imd_band", "age_band", "prev_attempts", "studied_credits", "disability", "final_result")
    COURSE_FIELD_NUMBER: _ClassVar[int]
    PRESENTATION_FIELD_NUMBER: _ClassVar[int]
    STUDENT_ID_FIELD_NUMBER: _ClassVar[int]
    GENDER_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    HIGHEST_EDUCATION_FIELD_NUMBER: _ClassVar[int]
    IMD_BAND_FIELD_NUMBER: _ClassVar[int]
    AGE_BAND_FIELD_NUMBER: _ClassVar[int]
    PREV_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    STUDIED_CREDITS_FIELD_NUMBER: _ClassVar[int]
    DISABILITY_FIELD_NUMBER: _ClassVar[int]
    FINAL_RESULT_FIELD_NUMBER: _ClassVar[int]
    course: str
    presentation: str
    student_id: int
    gender: str
    region: str
    highest_education: str
    imd_band: str
    age_band: str
    prev_attempts: int
    studied_credits: int
    disability: str
    final_result: str
    def __init__(self, course: _Optional[str] = ..., presentation: _Optional[str] = ..., student_id: _Optional[int] = ..., gender: _Optional[str] = ..., region: _Optional[str] = ..., highest_education: _Optional[str] = ..., imd_band: _Optional[str] = ..., age_band: _Optional[str] = ..., prev_attempts: _Optional[int] = ..., studied_credits: _Optional[int] = ..., disability: _Optional[str] = ..., final_result: _Optional[str] = ...) -> None: ...

class Registration(_message.Message):
    __slots__ = ("course", "presentation", "student_id", "registration_day", "unregistration_day")
    COURSE_FIELD_NUMBER: _ClassVar[int]
    PRESENTATION_FIELD_NUMBER: _ClassVar[int]
    STUDENT_ID_FIELD_NUMBER: _ClassVar[int]
    REGISTRATION_DAY_FIELD_NUMBER: _ClassVar[int]
    UNREGISTRATION_DAY_FIELD_NUMBER: _ClassVar[int]
    course: str
    presentation: str
    student_id: int
    registration_day: int
    unregistration_day: int
    def __init__(self, course: _Optional[str] = ..., presentation: _Optional[str] = ..., student_id: _Optional[int] = ..., registration_day: _Optional[int] = ..., unregistration_day: _Optional[int] = ...) -> None: ...

class Submission(_message.Message):
    __slots__ = ("assessment_id", "student_id", "submission_day", "banked", "score")
    ASSESSMENT_ID_FIELD_NUMBER: _ClassVar[int]
    STUDENT_ID_FIELD_NUMBER: _ClassVar[int]
    SUBMISSION_DAY_FIELD_NUMBER: _ClassVar[int]
    BANKED_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    assessment_id: int
    student_id: int
    submission_day: int
    banked: bool
    score: float
    def __init__(self, assessment_id: _Optional[int] = ..., student_id: _Optional[int] = ..., submission_day: _Optional[int] = ..., banked: _Optional[bool] = ..., score: _Optional[float] = ...) -> None: ...

class Resource(_message.Message):
    __slots__ = ("site_id", "course", "presentation", "activity_type")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    COURSE_FIELD_NUMBER: _ClassVar[int]
    PRESENTATION_FIELD_NUMBER: _ClassVar[int]
    ACTIVITY_TYPE_FIELD_NUMBER: _ClassVar[int]
    site_id: int
    course: str
    presentation: str
    activity_type: str
    def __init__(self, site_id: _Optional[int] = ..., course: _Optional[str] = ..., presentation: _Optional[str] = ..., activity_type: _Optional[str] = ...) -> None: ...

class EngagementEvent(_message.Message):
    __slots__ = ("course", "presentation", "student_id", "site_id", "day", "clicks")
    COURSE_FIELD_NUMBER: _ClassVar[int]
    PRESENTATION_FIELD_NUMBER: _ClassVar[int]
    STUDENT_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    DAY_FIELD_NUMBER: _ClassVar[int]
    CLICKS_FIELD_NUMBER: _ClassVar[int]
    course: str
    presentation: str
    student_id: int
    site_id: int
    day: int
    clicks: int
    def __init__(self, course: _Optional[str] = ..., presentation: _Optional[str] = ..., student_id: _Optional[int] = ..., site_id: _Optional[int] = ..., day: _Optional[int] = ..., clicks: _Optional[int] = ...) -> None: ...

class Term(_message.Message):
    __slots__ = ("course", "presentation", "student_id", "term", "units_enrolled", "units_approved", "grade", "grade_max")
    COURSE_FIELD_NUMBER: _ClassVar[int]
    PRESENTATION_FIELD_NUMBER: _ClassVar[int]
    STUDENT_ID_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    UNITS_ENROLLED_FIELD_NUMBER: _ClassVar[int]
    UNITS_APPROVED_FIELD_NUMBER: _ClassVar[int]
    GRADE_FIELD_NUMBER: _ClassVar[int]
    GRADE_MAX_FIELD_NUMBER: _ClassVar[int]
    course: str
    presentation: str
    student_id: int
    term: int
    units_enrolled: int
    units_approved: int
    grade: float
    grade_max: float
    def __init__(self, course: _Optional[str] = ..., presentation: _Optional[str] = ..., student_id: _Optional[int] = ..., term: _Optional[int] = ..., units_enrolled: _Optional[int] = ..., units_approved: _Optional[int] = ..., grade: _Optional[float] = ..., grade_max: _Optional[float] = ...) -> None: ...

class Attribute(_message.Message):
    __slots__ = ("name", "number", "label")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    name: str
    number: float
    label: str
    def __init__(self, name: _Optional[str] = ..., number: _Optional[float] = ..., label: _Optional[str] = ...) -> None: ...

class LearnerRecord(_message.Message):
    __slots__ = ("learner", "registration", "submissions", "events", "terms", "attributes")
    LEARNER_FIELD_NUMBER: _ClassVar[int]
    REGISTRATION_FIELD_NUMBER: _ClassVar[int]
    SUBMISSIONS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    TERMS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    learner: Learner
    registration: Registration
    submissions: _containers.RepeatedCompositeFieldContainer[Submission]
    events: _containers.RepeatedCompositeFieldContainer[EngagementEvent]
    terms: _containers.RepeatedCompositeFieldContainer[Term]
    attributes: _containers.RepeatedCompositeFieldContainer[Attribute]
    def __init__(self, learner: _Optional[_Union[Learner, _Mapping]] = ..., registration: _Optional[_Union[Registration, _Mapping]] = ..., submissions: _Optional[_Iterable[_Union[Submission, _Mapping]]] = ..., events: _Optional[_Iterable[_Union[EngagementEvent, _Mapping]]] = ..., terms: _Optional[_Iterable[_Union[Term, _Mapping]]] = ..., attributes: _Optional[_Iterable[_Union[Attribute, _Mapping]]] = ...) -> None: ...

class CampusData(_message.Message):
    __slots__ = ("version", "presentations", "assessments", "records", "resources")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PRESENTATIONS_FIELD_NUMBER: _ClassVar[int]
    ASSESSMENTS_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    version: ContractVersion
    presentations: _containers.RepeatedCompositeFieldContainer[Presentation]
    assessments: _containers.RepeatedCompositeFieldContainer[Assessment]
    records: _containers.RepeatedCompositeFieldContainer[LearnerRecord]
    resources: _containers.RepeatedCompositeFieldContainer[Resource]
    def __init__(self, version: _Optional[_Union[ContractVersion, _Mapping]] = ..., presentations: _Optional[_Iterable[_Union[Presentation, _Mapping]]] = ..., assessments: _Optional[_Iterable[_Union[Assessment, _Mapping]]] = ..., records: _Optional[_Iterable[_Union[LearnerRecord, _Mapping]]] = ..., resources: _Optional[_Iterable[_Union[Resource, _Mapping]]] = ...) -> None: ...
