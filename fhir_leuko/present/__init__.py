"""Presentation: the core's findings and decisions shown to people.

A table or CSV for ``fhir-leuko evaluate`` (:mod:`.table`), the line that says why nothing was found
(:mod:`.silence`), ``fhir-leuko explain`` (:mod:`.explain`), the self-contained HTML report and
its trend plots (:mod:`.report`, :mod:`.plot`), and the CDS service's card page (:mod:`.cardpage`).

No rule lives here: every value, limit, band, grade and reason comes from the rule core
(:class:`~fhir_leuko.core.model.Finding`, :class:`~fhir_leuko.core.decision.Decision`, the
patient records and problems). Rendering is pure too (text or bytes out, no files written): the
edge that owns the destination writes them. It may import :mod:`fhir_leuko.core` and
:mod:`fhir_leuko.errors` only; the CLI, the job and the service import it. The HTML report and
the plots need the ``report`` extra (matplotlib, Jinja2), imported only when used.
"""
