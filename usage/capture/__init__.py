"""Wire capture: chosen traffic recorded exactly as it crossed the wire (docs/capture.md).

`format` is the file format and its reader, `writer` the thread that masks and appends
exchanges off the request path; inspection, replay and HAR export read the files.
"""
