"""The COCO caption server's tokenisation, in Python: what pycocoevalcap's `PTBTokenizer` gives
(Stanford CoreNLP 3.4.1's `PTBTokenizer -preserveLines -lowerCase`, then its punctuation list
dropped), without starting Java, so validation and SCST rewards can tokenise in-process.

The Java tokenizer is a JFlex lexer: at each position every rule is tried, the longest match wins
(a rule's trailing context counts towards its length), and ties go to the earlier rule.
`_RULE_TABLE` restates those rules, in the same order, as Python regular expressions; `_lex`
applies them the same way. A rule whose alternatives Python would try first-come-first-served
is split into one pattern per alternative, so the longest still wins. Options are the ones the
command line gives: PTB3 escaping (brackets become -LRB- etc., quotes become `` and ''), new
lines kept, no Americanisation, no escaping of / and *.

Known differences, all outside ordinary captions:
- Characters are classified with Python's Unicode tables (letters, decimal digits, upper case);
  the lexer was generated (JFlex 1.4.3, 2014) with older ones, so characters Unicode has added
  or reclassified since may tokenise apart.
- Lower-casing: Java chooses the final form of a capital sigma by word boundaries, Python by
  the Unicode Final_Sigma rule, so "2x4Σ" ends in σ here and in ς in Java ("ΟΔΟΣ" agrees).
- Characters outside the Basic Multilingual Plane (emoji) are deleted, as Java deletes each of
  their UTF-16 halves; inside a URL or e-mail address Java keeps them, and so does this module,
  but a tie between two rules there may break the other way since Java counts two code units.
- A line break inside a caption other than "\\n" (\\r, \\v, \\f, U+2028, U+2029) ends the line
  for Java and shifts every later caption onto the wrong image in pycocoevalcap; here it is a
  space.
- Outside captions, JFlex 1.4.3's handling of a trailing context whose own length varies is
  approximated by taking the longest leading part that allows it.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import TypeVar

_Key = TypeVar("_Key", bound=Hashable)

# pycocoevalcap drops these tokens after tokenising; "-LRB-" and friends are lower-cased by then,
# so "-lrb-" survives, exactly as in the COCO evaluation server.
PUNCTUATIONS = frozenset([
    "''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
    ".", "?", "!", ",", ":", "-", "--", "...", ";",
])  # fmt: skip


def _char_class(keep: Callable[[str], bool], extra: str = "") -> str:
    """A regex character class of the Basic Multilingual Plane characters `keep` accepts: the
    Java lexer reads UTF-16 code units, so nothing above U+FFFF is in any of its classes."""
    ranges: list[str] = []
    start = None
    for code in range(0x10001):
        inside = code < 0x10000 and keep(chr(code))
        if inside and start is None:
            start = code
        elif not inside and start is not None:
            last = code - 1
            ranges.append(f"\\u{start:04x}" if start == last else f"\\u{start:04x}-\\u{last:04x}")
            start = None
    return "[" + "".join(ranges) + extra + "]"


def _category(prefix: str) -> Callable[[str], bool]:
    return lambda ch: unicodedata.category(ch).startswith(prefix)


# JFlex's [:letter:], [:digit:] and [:uppercase:]: Java's isLetter, isDigit and isUpperCase.
_EXTRA_LETTERS = (
    "\\u00ad\\u0237-\\u024f\\u02c2-\\u02c5\\u02d2-\\u02df\\u02e5-\\u02ff\\u0300-\\u036f"
    "\\u0370-\\u037d\\u0384\\u0385\\u03cf\\u03f6\\u03fc-\\u03ff\\u0483-\\u0487\\u04cf"
    "\\u04f6-\\u04ff\\u0510-\\u0525\\u055a-\\u055f\\u0591-\\u05bd\\u05bf\\u05c1\\u05c2\\u05c4"
    "\\u05c5\\u05c7\\u0615-\\u061a\\u063b-\\u063f\\u064b-\\u065e\\u0670\\u06d6-\\u06ef"
    "\\u06fa-\\u06ff\\u070f\\u0711\\u0730-\\u074f\\u0750-\\u077f\\u07a6-\\u07b1\\u07ca-\\u07f5"
    "\\u07fa\\u0900-\\u0903\\u093c\\u093e-\\u094e\\u0951-\\u0955\\u0962-\\u0963\\u0981-\\u0983"
    "\\u09bc-\\u09c4\\u09c7\\u09c8\\u09cb-\\u09cd\\u09d7\\u09e2\\u09e3\\u0a01-\\u0a03\\u0a3c"
    "\\u0a3e-\\u0a4f\\u0a81-\\u0a83\\u0abc-\\u0acf\\u0b82\\u0bbe-\\u0bc2\\u0bc6-\\u0bc8"
    "\\u0bca-\\u0bcd\\u0c01-\\u0c03\\u0c3e-\\u0c56\\u0d3e-\\u0d44\\u0d46-\\u0d48\\u0e30-\\u0e3a"
    "\\u0e47-\\u0e4e\\u0eb1-\\u0ebc\\u0ec8-\\u0ecd"
)


def _is_letter_or_digit(ch: str) -> bool:
    return unicodedata.category(ch)[0] == "L" or unicodedata.category(ch) == "Nd"


_ALPHA = _char_class(_category("L"))  # [:letter:]
_DIGIT0 = _char_class(_category("Nd"))  # [:digit:]
_ALNUM = _char_class(_is_letter_or_digit)  # [:letter:]|[:digit:]
_UPPER = _char_class(_category("Lu"))  # [:uppercase:]
_LETTER1 = _char_class(_category("L"), _EXTRA_LETTERS)
_LETTER_DIGIT1 = _char_class(_is_letter_or_digit, _EXTRA_LETTERS + "\\u07c0-\\u07c9")

# The lexer's macros (PTBLexer.flex). The lexer is caseless for literal text only, never inside
# [classes]: literal text is wrapped in (?i:...) and classes are left as they are.
_SPLET = r"&[aeiouAEIOU](?i:acute|grave|uml);"
_LETTER = rf"(?:{_LETTER1}|{_SPLET})"
_LETTER_DIGIT = rf"(?:{_LETTER_DIGIT1}|{_SPLET})"
_DIGIT = r"[" + _DIGIT0[1:-1] + r"\u07c0-\u07c9]"
_SPACE = r"[ \t\u00a0\u2000-\u200a\u3000]"
_NEWLINE = r"(?:\r\n?|[\n\u2028\u2029\x0b\x0c\x85])"
_SPACENL = rf"(?:{_SPACE}|{_NEWLINE})"
_SGML = (
    r"<(?:[!?][A-Za-z\-][^>\r\n]*|[A-Za-z][A-Za-z0-9_:.\-]*(?:[ ]+(?:[A-Za-z][A-Za-z0-9_:.\-]*"
    r"|[A-Za-z][A-Za-z0-9_:.\-]*[ ]*=[ ]*(?:'[^']*'|\"[^\"]*\")))*[ ]*/?|/[A-Za-z]"
    r"[A-Za-z0-9_:.\-]*)[ ]*>"
)
_SENTEND = rf"{_SPACENL}(?:{_SPACENL}|{_UPPER}|{_SGML})"
_WORD = rf"{_LETTER}{_LETTER_DIGIT}*(?:[.!?]{_LETTER}{_LETTER_DIGIT}*)*"
_APOS = r"(?:['\x92\u2019]|(?i:&apos;))"
_APOSETC = r"(?:['\x92\u2019`\x91\u2018\u201b]|(?i:&apos;))"
_REDAUX = rf"{_APOS}(?:[msdMSD]|(?i:re|ve|ll))"
_SREDAUX = rf"(?i:n){_APOSETC}(?i:t)"
_HYPHEN = r"[\-_\u058a\u2010\u2011]"
_THING_PART = rf"(?:[dDoOlL]{_APOSETC}{_ALNUM})?{_ALNUM}+"
_THING = rf"{_THING_PART}(?:{_HYPHEN}{_THING_PART})*"
_THINGA = r"[A-Z]+(?:(?:[+&]|(?i:&amp;))[A-Z]+)+"
_ACRO_NAMES = r"(?i:(?:canada|sino|korean|eu|japan|non)-u\.s|u\.s\.-(?:u\.k|u\.s\.s\.r))"
_ACRO = rf"(?:{_ACRO_NAMES}|[A-Za-z](?:\.[A-Za-z])*)"
_ACRO2 = rf"(?:{_ACRO_NAMES}|[A-Za-z](?:\.[A-Za-z])+)"
_HTHING = rf"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:{_ACRO2}\.|[A-Za-z0-9\u00ad]+))+"
_INSENTP = r"[,;:\u3001]"
_FILENAME_EXT = (  # longest first: Python takes the first alternative that fits
    "docx|class|html|java|jpeg|bat|bmp|cgi|cpp|dll|doc|exe|gif|htm|jar|jpg|mov|mp3|pdf|php|png"
    "|ppt|sql|tar|txt|wav|xml|zip|gz|pl|ps|py|c|h|x"
)
_ABMONTH = r"(?i:jan|feb|mar|apr|jun|jul|aug|sept|sep|oct|nov|dec)"
_ABDAYS = r"(?i:mon|tues|tue|wed|thurs|thu|fri)"
_ABSTATE = (
    r"(?:(?i:ala|ariz)|A(?i:z)|A(?i:rk)|(?i:calif|colo|conn|ct|dak)|D(?i:el)|(?i:fla|ga)"
    r"|I(?i:ll)|(?i:ind|kans?|ky)|L(?i:a)|M(?i:ass)|(?i:md|mich|minn)|M(?i:iss)"
    r"|(?i:mo|mont|neb|nev|okla)|O(?i:re)|P(?i:a)|(?i:penn|tenn)|T(?i:ex)|(?i:va|vt)|W(?i:ash)"
    r"|(?i:wisc?|wyo))"
)
_ABCOMP = (
    r"(?:(?i:inc|cos?|corp)|(?i:pp?t)[ye](?i:s?)|(?i:ltd|plc|rt|bancorp|bhd|assn|univ|intl|sys))"
)
_ABNUM = r"(?i:tel|est|ext|sq)"
_ABPTIT = r"(?i:jr|sr|bros|(?:ed|ph)\.d|blvd|rd|esq)"
_ABBREV1 = (
    rf"(?:{_ABMONTH}|{_ABDAYS}|{_ABSTATE}|{_ABCOMP}|{_ABNUM}|{_ABPTIT}|(?i:etc|al|seq|bldg))\."
)
_ABTITLE = (
    r"(?:(?i:mrs|mr|ms)|M(?i:iss)|(?i:drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?"
    r"|adm|rev|maj|sgt|cpl|pvt|capt|ste?|ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|mt"
    r"|ft|adj|adv|asst|assoc|ens|insp|mlle|mme|msgr|sfc))"
)
_ABBREV4_WORDS = r"(?i:vs|alex|wm|jos|cie|a\.k\.a|cf|treas|ph)"
_ABCOMP2 = r"(?:(?i:invt|elec|natl|dept)|(?i:m)[ft](?i:g))"
_ABBREV4 = (_ABTITLE, _ABBREV4_WORDS, _ACRO, _ABCOMP2)  # one rule entry each
_ABBREV3 = r"(?i:ca|figs?|prop|nos?|art|bldg|pp|op)\."
_SENTENCE_STARTERS = (  # the capital is a [class] in Java, so only it is case-sensitive
    r"A(?i:bout|ccording|dditionally|fter|n|s|t)?|B(?i:ut)|E(?i:arlier)|H(?i:e|er|ere|owever)"
    r"|I(?i:f|n|t)|L(?i:ast)|M(?i:any|ore|r\.|s\.)|N(?i:ow)|O(?i:nce|ne|ther|ur)"
    r"|S(?i:he|ince|o|ome|uch)|T(?i:hat|he|heir|hen|here|hese|hey|his)"
    r"|W(?i:e|hen|hile|hat)|Y(?i:et|ou)"
)
_QUOTE_CHARS = (
    r"[`\u2018\u2019\u201a\u201b\u201c\u201d\x91\x92\x93\x94\u201e\u201f\u2039\u203a\xab\xbb]"
)
_MISCSYMBOL = (
    r"[+%&~\^|\\\u00a6\u00a7\u00a8\u00a9\u00ac\u00ae\u00af\u00b0-\u00b3\u00b4-\u00ba\u00d7"
    r"\u00f7\u0387\u05be\u05c0\u05c3\u05c6\u05f3\u05f4\u0600-\u0603\u0606-\u060a\u060c\u0614"
    r"\u061b\u061e\u066a\u066d\u0703-\u070d\u07f6\u07f7\u07f8\u0964\u0965\u0e4f\u1fbd\u2016"
    r"\u2017\u2020-\u2023\u2030-\u2038\u203b\u203e-\u2042\u2044\u207a-\u207f\u208a-\u208e"
    r"\u2100-\u214f\u2190-\u21ff\u2200-\u2bff\u3012\u30fb\uff01-\uff0f\uff1a-\uff20"
    r"\uff3b-\uff40\uff5b-\uff65]"
)
_PHONE = (
    r"(?:\([0-9]{2,3}\)[ \u00a0]?|(?:\+\+?)?(?:[0-9]{2,4}[\- \u00a0])?[0-9]{2,4}[\- \u00a0])"
    r"[0-9]{3,4}[\- \u00a0]?[0-9]{3,5}",
    r"(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}",
)
_URL_END = r"[^ \t\n\f\r\"<>|.!?(){},\-]"
_LIKELYURL_PATH = rf"(?:/[^ \t\n\f\r\"<>|()]+{_URL_END})?"
_NOT_EMAIL = r"[^ \t\n\f\r\"<>|(){}.\u00a0]"

# ---- what a rule makes of its text ----------------------------------------------------------
# An action takes the matched text (trailing context excluded) and returns the token, or None
# for none, and how many characters it consumed (fewer than matched where JFlex pushes back).
_Action = Callable[[str], "tuple[str | None, int]"]
_NEW_LINE = "\n"  # the token that ends a line; no rule can make it otherwise


def _keep(text: str) -> tuple[str | None, int]:
    return text, len(text)


def _drop(text: str) -> tuple[str | None, int]:
    return None, len(text)


def _constant(token: str) -> _Action:
    return lambda text: (token, len(text))


def _edit(change: Callable[[str], str]) -> _Action:
    return lambda text: (change(text), len(text))


def _pushback(count: int) -> _Action:
    """Splits "cannot" into "can" + "not", "gonna" into "gon" + "na": the rest is lexed
    again."""
    return lambda text: (text[:-count], len(text) - count)


def _abbreviation_then_period(text: str) -> tuple[str | None, int]:
    """Sentence-final "etc.": the token keeps its period and the period is lexed again."""
    return text, len(text) - 1


def _acronym_then_period(text: str) -> tuple[str | None, int]:
    """An acronym before a likely sentence start: "I." gives "I" then "."; "U.S." gives "U.S."
    then "." again."""
    if len(text) == 2:
        return text[0], 1
    return text, len(text) - 1


def _soft(text: str) -> str:
    """The soft hyphen only marks where a line may break."""
    return text.replace("\u00ad", "") or "-"


def _amp(text: str) -> str:
    return re.sub(r"(?i:&amp;)", "&", text)


def _nbsp(text: str) -> str:
    """A token never holds a space: Java makes it a no-break space."""
    return text.replace(" ", "\u00a0")


def _parens(text: str) -> str:
    return text.replace("(", "-LRB-").replace(")", "-RRB-")


def _latex_quotes(left: bool) -> _Action:
    def quotes(text: str) -> tuple[str | None, int]:
        token = re.sub("&apos;|'", "`" if left else "'", text)
        token = re.sub('"|&quot;', "``" if left else "''", token)
        token = re.sub("[\x91\u2018\u201b\u2039]", "`", token)
        token = re.sub("[\x92\u2019\u203a]", "'", token)
        token = re.sub("[\x93\u201c\u00ab]", "``", token)
        return re.sub("[\x94\u201d\u00bb]", "''", token), len(text)

    return quotes


def _dashes(text: str) -> str:
    return "--" if 3 <= len(text) <= 4 else text


_FRACTIONS = str.maketrans({"¼": "1/4", "½": "1/2", "¾": "3/4", "⅓": "1/3", "⅔": "2/3"})
_CURRENCY = str.maketrans({"¢": "cents", "£": "#", "\x80": "$", "¤": "$", "₠": "$", "€": "$"})

# ---- the rules, in PTBLexer.flex's order --------------------------------------------------
# (leading part, or a tuple of a rule's alternatives; trailing context or None; action). A rule's
# place in the table is its rank.
_RULE_TABLE: list[tuple[str | tuple[str, ...], str | None, _Action]] = [
    (r"(?i:c\+\+)", None, _keep),
    (r"(?i:[cf]#)", None, _keep),
    (r"(?i:cannot)", None, _pushback(3)),
    (r"(?i:'twas)", None, _pushback(3)),
    (r"(?i:'tis)", None, _pushback(2)),
    (r"(?i:gonna|gotta|lemme|gimme|wanna)", None, _pushback(2)),
    (_SGML, None, _edit(_nbsp)),
    (r"(?i:&(?:md|mdash|ndash);)|[\x96\x97\u2013\u2014\u2015]", None, _constant("--")),
    (r"(?i:&amp;)", None, _edit(_amp)),
    (r"(?i:&(?:ht|tl|ur|lr|qc|ql|qr|odq|cdq|#[0-9]+);)", None, _keep),
    (_WORD, _REDAUX, _edit(_soft)),
    (r"[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*", _SREDAUX, _edit(_soft)),
    (_WORD, None, _edit(_soft)),
    (
        (
            rf"{_APOS}(?i:n){_APOS}?",
            rf"[lLdDjJ]{_APOS}",
            rf"(?i:dunkin|somethin|ol){_APOS}",
            rf"{_APOS}(?i:em)",
            rf"[A-HJ-XZn]{_APOSETC}{_ALPHA}{{2}}{_ALPHA}*",
            rf"{_APOS}[2-9]0(?i:s)",
            rf"{_APOS}(?i:till?)",
            rf"{_ALPHA}{_ALPHA}*[aeiouyAEIOUY]{_APOSETC}[aeiouA-Z]{_ALPHA}*",
            rf"{_APOS}(?i:cause)",
            r"(?i:cont'd\.?)",
            r"(?i:'twas|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)",
            rf"(?i:o){_APOSETC}(?i:o)",
        ),
        None,
        _keep,
    ),
    (rf"(?i:y){_APOS}", _ALPHA, _keep),
    (r"(?i:https?://)[^ \t\n\f\r\"<>|(){}]+" + _URL_END, None, _keep),
    (
        (
            rf"(?i:www)\.(?:[^ \t\n\f\r\"<>|.!?(){{}},]+\.)+[a-zA-Z]{{2,4}}{_LIKELYURL_PATH}",
            rf"(?:[^ \t\n\f\r\"`'<>|.!?(){{}},-_$]+\.)+(?i:com|net|org|edu){_LIKELYURL_PATH}",
        ),
        None,
        _keep,
    ),
    (
        rf"(?:(?i:&lt;)|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00a0{{}}]*@(?:{_NOT_EMAIL}+\.)*"
        rf"{_NOT_EMAIL}+(?:(?i:&gt;)|>)?",
        None,
        _keep,
    ),
    ((r"@[a-zA-Z_][a-zA-Z_0-9]*", rf"#{_LETTER}+"), None, _keep),
    (_REDAUX, r"[^A-Za-z]", _latex_quotes(left=False)),
    (_SREDAUX, r"[^A-Za-z]", _latex_quotes(left=False)),
    (rf"{_DIGIT}{{1,2}}[\-/]{_DIGIT}{{1,2}}[\-/]{_DIGIT}{{2,4}}", None, _keep),
    (
        rf"[\-+]?(?:{_DIGIT}*(?:[.:,\u00ad\u066b\u066c]{_DIGIT}+)+|{_DIGIT}+)",
        None,
        _edit(_soft),
    ),
    (
        r"[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)",
        None,
        _keep,
    ),
    (
        rf"(?:{_DIGIT}{{1,4}}[\- \u00a0])?{_DIGIT}{{1,4}}(?:\\?/|\u2044){_DIGIT}{{1,4}}",
        None,
        _edit(_nbsp),
    ),
    (r"[\u00bc\u00bd\u00be\u2153-\u215e]", None, _edit(lambda t: t.translate(_FRACTIONS))),
    (
        rf"(?i:-(?:rrb|lrb|rcb|lcb|rsb|lsb)-|c\.d\.s|pro-|anti-|s(?:&|&amp;)p-500|s(?:&|&amp;)ls"
        rf"|cap{_APOS}n|c{_APOS}est)",
        None,
        _edit(_amp),
    ),
    (
        r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}",
        None,
        _keep,
    ),
    ((r"[A-Z]*\$", "#"), None, _keep),
    (
        r"[\u00a2\u00a3\u00a4\u00a5\x80\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]",
        None,
        _edit(lambda t: t.translate(_CURRENCY)),
    ),
    (
        rf"{_ACRO}\.",
        rf"{_SPACENL}+(?:{_SENTENCE_STARTERS}|{_SGML}){_SPACENL}",
        _acronym_then_period,
    ),
    (_ABBREV3, rf"{_SPACENL}?{_DIGIT0}", _keep),
    (r"(?:(?i:pt)[eyEY]|(?i:co))\.", rf"{_SPACE}(?i:ltd|lim)", _keep),
    (_ABBREV1, _SENTEND, _abbreviation_then_period),
    (_ABBREV1, r"[\s\S]{2}", _keep),
    (_ABBREV1, None, _abbreviation_then_period),
    (tuple(rf"{part}\." for part in _ABBREV4), None, _keep),
    (_ABBREV4, _SPACE, _keep),
    (_ACRO, _SPACENL, _keep),
    (rf"{_APOS}[0-9][0-9]", _SPACENL, _keep),
    (
        rf"{_LETTER_DIGIT}+(?:\.{_LETTER_DIGIT}+)*\.(?i:{_FILENAME_EXT})",
        rf"{_SPACENL}|[.?!,]",
        _keep,
    ),
    (rf"{_WORD}\.", _INSENTP, _edit(_soft)),
    (_PHONE, None, _edit(lambda t: _parens(_nbsp(t)))),
    (r"\"|(?i:&quot;)", r"[A-Za-z0-9$]", _latex_quotes(left=True)),
    (r"\"|(?i:&quot;)", None, _latex_quotes(left=False)),
    (r"\x7f", None, _drop),
    (r"<|(?i:&lt;)", None, _constant("<")),
    (r">|(?i:&gt;)", None, _constant(">")),
    (r"[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]]", r"[^A-Za-z0-9]", _edit(_parens)),
    (
        (
            r"[\^x=~<>]\.\[\^(?i:x)=~<>\]",
            r"[\-\^x=~<>']_[\-\^x=~<>']",
            r"\([\-\^x=~<>'][_.]?[\-\^x=~<>']\)",
            r"\([\^x=~<>']-[\^x=~<>'`]\)",
        ),
        None,
        _edit(_parens),
    ),
    (r"\{", None, _constant("-LCB-")),
    (r"\}", None, _constant("-RCB-")),
    (r"\[", None, _constant("-LSB-")),
    (r"\]", None, _constant("-RSB-")),
    (r"\(", None, _constant("-LRB-")),
    (r"\)", None, _constant("-RRB-")),
    (r"-+", None, _edit(_dashes)),
    ((r"\.{3,5}", r"(?:\.[ \u00a0]){2,4}\.", r"[\x85\u2026]"), None, _constant("...")),
    ((r"@+", r"#+", r"_+"), None, _keep),
    ((r"\*+", r"(?:\\\*){1,3}"), None, _keep),
    (_INSENTP, None, _keep),
    (r"[?!]+", None, _keep),
    (r"[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002]", None, _keep),
    (r"=", None, _keep),
    (r"/", None, _keep),
    (rf"{_HTHING}\.", _INSENTP, _edit(_soft)),
    (_HTHING, None, _edit(_soft)),
    (rf"{_THING}\.", _INSENTP, _keep),
    (_THING, None, _keep),
    (rf"{_THINGA}\.", _INSENTP, _edit(_amp)),
    (_THINGA, None, _edit(_amp)),
    ("'", r"[A-Za-z][^ \t\n\r\u00a0]", _latex_quotes(left=True)),
    (_REDAUX, None, _latex_quotes(left=False)),
    (_SREDAUX, None, _latex_quotes(left=False)),
    ((_APOS, "''", _QUOTE_CHARS + "{1,2}"), None, _latex_quotes(left=False)),
    (r"<<|>>", None, _keep),
    (_MISCSYMBOL, None, _keep),
    (r"\x00|[ \t\u00a0\u2000-\u200a\u3000]+|[\u200b\u200e\u200f\ufeff]", None, _drop),
    (_NEWLINE, None, _constant(_NEW_LINE)),
    (r"(?i:&nbsp;)", None, _drop),
    (r"[^\n]", None, _drop),  # untokenizable: Java deletes it with a warning
]


@functools.lru_cache(maxsize=1)
def _rules() -> list[tuple[re.Pattern[str], bool, _Action]]:
    """The table compiled, on first use rather than at import (about a tenth of a second)."""
    compiled = []
    for leads, context, action in _RULE_TABLE:
        for lead in (leads,) if isinstance(leads, str) else leads:
            pattern = f"(?:{lead})" + (f"(?=(?P<context>{context}))" if context else "")
            compiled.append((re.compile(pattern), context is not None, action))
    return compiled


_SPECIAL_WORDS = frozenset(["cannot", "gonna", "gotta", "lemme", "gimme", "wanna"])
# A plain ASCII word before a space, a line end or the end of the text is its own token under
# every rule (none can match longer and give other text) unless it is one that gets split.
_PLAIN_WORD = re.compile(r"[A-Za-z]+(?=[ \t\n]|\Z)")
_BLANKS = re.compile(rf"[ \t]{_SPACE}*")  # nothing else starts with " " or tab


def _lex(text: str, *, shortcut: bool = True) -> Iterator[str]:
    """The tokens of `text`, "\\n" for each line break, as JFlex's longest-match lexer gives
    them. `shortcut` skips the rule table for plain words and blanks (same result, faster)."""
    rules = _rules()
    position, end = 0, len(text)
    while position < end:
        if shortcut:
            if blanks := _BLANKS.match(text, position):
                position = blanks.end()
                continue
            word = _PLAIN_WORD.match(text, position)
            if word and word.group().lower() not in _SPECIAL_WORDS:
                yield word.group()
                position = word.end()
                continue
        best, best_length = None, 0
        for pattern, has_context, action in rules:
            match = pattern.match(text, position)
            if match is None:
                continue
            length = match.end() - position
            if has_context:
                length += len(match.group("context"))
            if length > best_length:  # rules come in order: a tie keeps the earlier
                best, best_length = (match, action), length
        assert best is not None  # the last rule takes any character but "\n"; NEWLINE takes "\n"
        token, consumed = best[1](best[0].group())
        position += consumed
        if token is not None:
            yield token


_LINE_BREAKS = re.compile(r"[\r\n\u2028\u2029\x0b\x0c]")


def _caption_text(caption: str | Mapping[str, str]) -> str:
    text = caption["caption"] if isinstance(caption, Mapping) else caption
    return _LINE_BREAKS.sub(" ", text)


def _lines(text: str) -> list[str]:
    """Lower-cased tokens a line, punctuation dropped, joined by spaces as pycocoevalcap does."""
    lines: list[list[str]] = [[]]
    for token in _lex(text):
        if token == _NEW_LINE:
            lines.append([])
        else:
            lines[-1].append(token.lower())
    return [
        " ".join(t for t in " ".join(line).rstrip().split(" ") if t not in PUNCTUATIONS)
        for line in lines
    ]


def tokenize(
    captions: Mapping[_Key, Sequence[str] | Sequence[Mapping[str, str]]],
) -> dict[_Key, list[str]]:
    """What pycocoevalcap's `PTBTokenizer().tokenize(captions)` returns, without Java.

    `captions` maps a key (an image id) to its captions, plain strings or pycocoevalcap's
    `{"caption": str}` records. The result maps each key to its captions tokenised: lower case,
    space-separated, punctuation dropped. Java reads all captions as one text, a line each, and a
    few rules look past a line's end (an abbreviation before "A ..." or "The ..."), so this does
    the same: a caption can tokenise differently beside other captions than alone.
    """
    keys = [key for key, group in captions.items() for _ in group]
    text = "\n".join(_caption_text(c) for group in captions.values() for c in group)
    result: dict[_Key, list[str]] = {key: [] for key in captions}
    for key, line in zip(keys, _lines(text) if keys else [], strict=True):
        result[key].append(line)
    return result


def tokenize_caption(caption: str) -> str:
    """One caption tokenised on its own, as pycocoevalcap would tokenise it alone: for scoring
    sampled captions one at a time."""
    return _lines(_caption_text(caption))[0]
