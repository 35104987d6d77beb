"""Codings and texts of CodeableConcepts, as the knowledge's drug and cause matchers want them."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from ..fhirjson import CodeableConcept

__all__ = ["codings", "texts"]


def codings(concepts: Iterable[CodeableConcept | None]) -> Iterator[tuple[str | None, str | None]]:
    for concept in concepts:
        if concept is not None:
            for coding in concept.coding:
                yield coding.system, coding.code


def texts(concepts: Iterable[CodeableConcept | None]) -> Iterator[str]:
    for concept in concepts:
        if concept is None:
            continue
        if concept.text:
            yield concept.text
        for coding in concept.coding:
            if coding.display:
                yield coding.display
