"""The DICOM node (pynetdicom): receive chest X-rays from a modality or a PACS, analyse them through
chestxray.service, send the results back as Secondary Capture + Structured Report. No Flask here: the web app
starts the node beside it (chestxray.web.worklist.start_node) and shows what it received on /worklist."""
