"""A minimal PDF writer for tests: text lines at given positions and sizes, in the 14 standard fonts.

Written here (not a dependency) because the tests need exact control over layout: a table's columns, a title in
a larger font, a page without any text.
"""

from __future__ import annotations

# x, y (from the bottom), font size, text; prefix "B:" = Helvetica-Bold, "N:" = a bold font known by its name only
# ("Times New Roman,Bold" without a stated weight, as many filings' fonts are)
Line = tuple[float, float, float, str]
FONTS = {"": ("F1", b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"),
         "B:": ("F2", b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica-Bold /Encoding /WinAnsiEncoding >>"),
         "N:": ("F3", b"<< /Type /Font /Subtype /TrueType /BaseFont /Times#20New#20Roman,Bold "
                      b"/Encoding /WinAnsiEncoding >>")}


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def make_pdf(pages: list[list[Line] | None], title: str | None = None, author: str | None = None) -> bytes:
    """Pages of text lines; None: a scanned page (one grey image over the whole page, no text)."""
    objects: list[bytes] = []
    page_ids = []
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objects.append(b"")  # pages tree, filled in below
    font_ids = {}
    for name, font in FONTS.values():
        objects.append(font)
        font_ids[name] = len(objects)
    objects.append(b"<< /Type /XObject /Subtype /Image /Width 1 /Height 1 /ColorSpace /DeviceGray "
                   b"/BitsPerComponent 8 /Length 1 >>\nstream\n\x80\nendstream")
    image_id = len(objects)
    for lines in pages:
        if lines is None:
            stream = ["q 612 0 0 792 0 0 cm /Im1 Do Q"]
        else:
            stream = []
            for x, y, size, text in lines:
                prefix = text[:2] if text[:2] in FONTS else ""
                font = FONTS[prefix][0]
                stream.append(f"BT /{font} {size} Tf {x} {y} Td ({_escape(text.removeprefix(prefix))}) Tj ET")
        content = "\n".join(stream).encode("latin-1")
        objects.append(b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream")
        content_id = len(objects)
        fonts = " ".join(f"/{name} {number} 0 R" for name, number in font_ids.items())
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {content_id} 0 R "
                       f"/Resources << /Font << {fonts} >> /XObject << /Im1 {image_id} 0 R >> >> >>".encode())
        page_ids.append(len(objects))
    kids = " ".join(f"{number} 0 R" for number in page_ids)
    objects[1] = f"<< /Type /Pages /Kids [{kids}] /Count {len(page_ids)} >>".encode()
    info = " ".join(f"/{key} ({_escape(value)})" for key, value in (("Title", title), ("Author", author)) if value)
    objects.append(f"<< {info} >>".encode())
    info_id = len(objects)

    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R /Info %d 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, info_id, xref)
    return bytes(out)


def report_with_table() -> bytes:
    """Two pages: a cover with the issuer and period, then a titled section with a four-column table."""
    cover = [(72, 720, 20, "B:Quarterly Report"), (72, 690, 11, "Northwind Traders Inc."),
             (72, 672, 11, "For the quarterly period ended March 31, 2024"),
             (72, 640, 11, "This report describes the results of the quarter in words and numbers.")]
    table = [(72, 720, 14, "B:Results of Operations"),
             (72, 700, 10, "Net sales rose in every region, as the table below shows."),
             (300, 670, 10, "2024"), (380, 670, 10, "2023"), (460, 670, 10, "Change"),
             (72, 650, 10, "Net sales"), (300, 650, 10, "1,250"), (380, 650, 10, "1,100"), (460, 650, 10, "14%"),
             (72, 635, 10, "Cost of sales"), (300, 635, 10, "700"), (380, 635, 10, "640"), (460, 635, 10, "9%"),
             (72, 620, 10, "Operating income"), (300, 620, 10, "310"), (380, 620, 10, "260"), (460, 620, 10, "19%")]
    return make_pdf([cover, table], title=None, author="jdoe")


def scan_without_text() -> bytes:
    """Two scanned pages: images, no text layer."""
    return make_pdf([None, None])


def report_with_scanned_pages() -> bytes:
    """A typed report whose signed pages 2 and 4 were scanned in (images only), as filings' exhibits often are."""
    typed = [(72, 720, 11, "Quarterly Operations Report"),
             (72, 700, 10, "Deliveries rose in every region; the warehouse in Leeds reopened in March.")]
    return make_pdf([typed, None, [(72, 720, 10, "Staffing stayed flat at 412 people through the quarter.")], None])


def statement_with_caption(rows: int = 30) -> bytes:
    """A filing's statement page: the issuer's name, a bold title and a unit line right above a long table."""
    cover = [(72, 720, 20, "B:Annual Report"), (72, 690, 11, "Globex Corporation"),
             (72, 660, 11, "For the fiscal year ended December 31, 2023"),
             (72, 630, 11, "This report describes the year in words and numbers.")]
    statement = [(72, 740, 10, "Globex Corp."), (72, 725, 12, "B:CONSOLIDATED BALANCE SHEETS"),
                 (72, 710, 10, "(In millions)"), (300, 690, 10, "2023"), (380, 690, 10, "2022")]
    for row in range(rows):
        y = 670 - 18 * row
        statement += [(72, y, 10, f"Balance sheet line item {row}"), (300, y, 10, f"{1000 + row:,}"),
                      (380, y, 10, f"{900 + row:,}")]
    return make_pdf([cover, statement])


def table_overleaf(rows: int = 12) -> bytes:
    """A table introduced at the foot of one page (a heading and a sentence ending "as follows (dollars in
    millions):") whose figures start the next page, and continue onto a third page without repeating anything."""
    intro = [(72, 720, 20, "B:Quarterly Report"), (72, 690, 11, "Initech Inc."),
             (72, 660, 11, "For the quarterly period ended June 30, 2024"),
             (72, 600, 10, "Our products are sold through our retail and online stores and through resellers."),
             (72, 120, 12, "B:Gross Margin"),
             (72, 100, 10, "Products and services gross margin and gross margin percentage were as follows "
                           "(dollars in millions):")]
    figures = [(300, 740, 10, "Three Months Ended"), (300, 725, 10, "June 30, 2024"), (400, 725, 10, "June 30, 2023")]
    for row in range(rows):
        y = 700 - 18 * row
        figures += [(72, y, 10, f"Gross margin line {row}"), (300, y, 10, f"{2000 + row:,}"),
                    (400, y, 10, f"{1800 + row:,}")]
    figures += [(72, 700 - 18 * rows, 10, "Total gross margin percentage"), (300, 700 - 18 * rows, 10, "44.3 %"),
                (400, 700 - 18 * rows, 10, "43.1 %")]
    more = [(72, 700 - 18 * row, 10, f"Further margin line {row}") for row in range(3)]
    more = [cell for row, line in enumerate(more)
            for cell in (line, (300, line[1], 10, f"{50 + row}"), (400, line[1], 10, f"{40 + row}"))]
    return make_pdf([intro, figures, more])


def statements_as_filers_set_them() -> bytes:
    """Two statements captioned as filings often are: the issuer's name set as a heading above the statement's
    title; a title in the body font (after an auditor's report, whose heading must not carry over) above rows
    split by a group label longer than a line of prose. The report's page has a bold label in a small font."""
    income = [(72, 740, 10, "B:GLOBEX CORPORATION"), (72, 725, 10, "B:CONSOLIDATED STATEMENTS OF INCOME"),
              (72, 710, 10, "(In millions)"), (300, 690, 10, "2023"), (380, 690, 10, "2022"),
              (72, 670, 10, "Revenue"), (300, 670, 10, "5,000"), (380, 670, 10, "4,500"),
              (72, 655, 10, "Operating income"), (300, 655, 10, "1,200"), (380, 655, 10, "1,000")]
    audit = [(72, 740, 12, "B:Report of Independent Registered Public Accounting Firm"),
             (72, 720, 10, "We have audited the accompanying balance sheets of Globex Corporation."),
             (72, 700, 8, "B:WEIGHTED AVERAGE"), (72, 685, 10, "Our opinion on the statements follows.")]
    label = "Adjustments to reconcile net income to net cash provided by operating activities for the year:"
    cash = [(72, 740, 10, "Consolidated Statements of Cash Flows"), (72, 725, 10, "$ in millions"),
            (300, 705, 10, "2023"), (380, 705, 10, "2022"),
            (72, 685, 10, "Net income"), (300, 685, 10, "900"), (380, 685, 10, "800"),
            (72, 670, 10, label),
            (72, 655, 10, "Depreciation"), (300, 655, 10, "150"), (380, 655, 10, "140"),
            (72, 640, 10, "Stock-based compensation"), (300, 640, 10, "60"), (380, 640, 10, "55")]
    return make_pdf([income, audit, cash])


def column_labels_as_filers_set_them() -> bytes:
    """Tables whose column labels are set as filings set them: a bold "Years Ended" over the values and a line whose
    first cell heads the row labels, above rows split by two nested group labels; then label cells ("Fiscal",
    "2023") above a table, parted from its rows by a line in the labels' column."""
    comprehensive = [(72, 740, 12, "B:CONSOLIDATED STATEMENTS OF COMPREHENSIVE INCOME"),
                     (72, 725, 10, "(In thousands)"), (300, 705, 10, "B:Years Ended"),
                     (72, 690, 10, "(in millions)"), (300, 690, 10, "2023"), (380, 690, 10, "2022"),
                     (72, 670, 10, "Net income"), (300, 670, 10, "900"), (380, 670, 10, "800"),
                     (72, 655, 10, "Other comprehensive income (loss), net of taxes:"),
                     (80, 640, 10, "Available-for-sale securities:"),
                     (88, 625, 10, "Unrealized gains"), (300, 625, 10, "15"), (380, 625, 10, "(9)"),
                     (72, 610, 10, "Total comprehensive income"), (300, 610, 10, "915"), (380, 610, 10, "791")]
    segments = [(72, 740, 14, "B:Segment Results"),
                (72, 720, 10, "Sales rose in both segments, as the table below shows."),
                (300, 700, 10, "Fiscal"), (380, 700, 10, "Fiscal"), (300, 688, 10, "2023"), (380, 688, 10, "2022"),
                (72, 672, 10, "Sales to customers by segment"),
                (72, 657, 10, "Consumer"), (300, 657, 10, "1,200"), (380, 657, 10, "1,100"),
                (72, 642, 10, "Enterprise"), (300, 642, 10, "800"), (380, 642, 10, "700")]
    return make_pdf([comprehensive, segments])


def notes_as_filers_set_them() -> bytes:
    """Two pages of a filing's notes: each under the issuer's name set in bold, a note's heading in a bold font that
    states no weight on the first, and the text continuing on the second."""
    first = [(72, 740, 10, "B:GLOBEX CORPORATION"), (72, 725, 10, "NOTES TO CONSOLIDATED FINANCIAL STATEMENTS"),
             (72, 700, 10, "N:Merchandise Inventories"),
             (72, 685, 10, "Merchandise inventories are recorded at the lower of cost and net realizable value.")]
    second = [(72, 740, 10, "B:GLOBEX CORPORATION"),
              (72, 725, 10, "Notes to Consolidated Financial Statements (continued)"),
              (72, 700, 10, "Our inventory valuation reflects adjustments for anticipated physical losses.")]
    return make_pdf([first, second])


def long_report(pages: int) -> bytes:
    """A report of many pages, each under a running header and over a page number (page furniture), with a section
    title, a paragraph and a small table, as a long filing has."""
    cover = [(72, 720, 20, "B:Annual Report"), (72, 690, 11, "Initech Holdings Inc."),
             (72, 660, 11, "For the fiscal year ended June 30, 2024")]
    body = [[(72, 760, 8, "Initech Holdings Inc. | Annual Report 2024"), (72, 700, 14, f"B:Segment {n} results"),
             (72, 685, 10, f"Segment {n} sales grew as its customers renewed; the table shows the two years."),
             (300, 670, 10, "2024"), (380, 670, 10, "2023"),
             (72, 650, 10, "Net sales"), (300, 650, 10, f"{n},250"), (380, 650, 10, f"{n},100"),
             (72, 635, 10, "Operating income"), (300, 635, 10, f"{n}10"), (380, 635, 10, f"{n}05"),
             (300, 30, 9, str(n + 1))] for n in range(1, pages)]
    return make_pdf([cover, *body])
